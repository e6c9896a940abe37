"""ftserve against the golden vectors in adapters_spec/golden/.

The vectors are computed from the spec's formulas in float64 by adapters_spec/make_golden.py, which never
imports ftserve. Inputs are exact in float32; ftserve computes in float32, so outputs (values of order 1 to 10)
are compared at rtol = atol = 1e-5, and the three-step Delta-LoRA trajectory, whose rounding compounds over
the steps, at rtol = atol = 1e-4.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.methods import get_method

GOLDEN = Path(__file__).resolve().parent.parent / "adapters_spec" / "golden"
TOL = {"rtol": 1e-5, "atol": 1e-5}
TRAJECTORY_TOL = {"rtol": 1e-4, "atol": 1e-4}
ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight", "lora_A_start.weight", "lora_B_start.weight",
                "vera_lambda_b", "vera_lambda_d", "lora_magnitude_vector")


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def base_layer(case: dict) -> nn.Module:
    """An nn.Linear or a GPT-2 Conv1D holding the case's exact base weight (as stored) and bias."""
    layer = nn.Linear(case["d_in"], case["d_out"]) if case["layer"] == "linear" else Conv1D(case["d_out"], case["d_in"])
    with torch.no_grad():
        layer.weight.copy_(f32(case["inputs"]["base_weight"]))
        layer.bias.copy_(f32(case["inputs"]["base_bias"]))
    layer.requires_grad_(False)
    return layer


def adapter_state(inputs: dict) -> dict[str, torch.Tensor]:
    return {key: f32(value) for key, value in inputs.items() if key in ADAPTER_KEYS}


class OneLayer(nn.Module):
    """The smallest model FineTuningModel can wrap: one targetable layer named ``proj``."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def check_layer(layer, case: dict, config: FineTuningConfig, shared: dict | None = None) -> None:
    """Forward, dense delta, export factors (from the layer and from its saved state), fold and unfold."""
    x, expected = f32(case["inputs"]["x"]), case["expected"]
    export = expected["export"]
    with torch.no_grad():
        assert_close(layer(x), f32(expected["h"]), **TOL)
        assert_close(layer.delta_weight(), f32(expected["delta_weight"]), **TOL)
        from_state = get_method(config.method).export_factors(adapter_state(case["inputs"]), shared or {}, config,
                                                              "proj", case["d_in"])
        for factors in (layer.lora_factors(), from_state):
            assert factors.rank == export["rank"]
            assert_close(factors.A.float(), f32(export["A"]), **TOL)
            assert_close(factors.B.float(), f32(export["B"]), **TOL)
            assert factors.scale == pytest.approx(export["scale"], rel=1e-10)
            if "magnitude" in export:  # the row-scaled form
                assert_close(factors.magnitude.float(), f32(export["magnitude"]), **TOL)
                assert_close(factors.row_scale(layer.base_weight()), f32(expected["row_scale"]), **TOL)
        original = layer.base_layer.weight
        layer.fold()
        assert_close(layer.base_layer.weight, f32(expected["folded_base_weight"]), **TOL)
        assert_close(layer(x), f32(expected["h"]), **TOL)
        layer.unfold()
        assert layer.base_layer.weight is original


def build(case: dict, config: FineTuningConfig, shared=None):
    layer = get_method(config.method).create_layer(base_layer(case), "proj", config, shared)
    state = adapter_state(case["inputs"])
    layer.prepare_for_state(set(state))
    layer.load_adapter_state(state)
    return layer


LORA_LIKE = [(name, case) for name in ("lora", "loraplus", "lora_fa", "delta_lora") for case in golden(name)["cases"]]


@pytest.mark.parametrize("name,case", LORA_LIKE, ids=[f"{n}-{c['name']}" for n, c in LORA_LIKE])
def test_lora_family_layer_matches_golden(name, case):
    config = FineTuningConfig(**case["config"])
    layer = build(case, config)
    if "scale" in case:
        assert layer.scale == pytest.approx(case["scale"], rel=1e-10)
    check_layer(layer, case, config)


@pytest.mark.parametrize("case", golden("dora")["cases"], ids=lambda c: c["name"])
def test_dora_layer_matches_golden(case):
    config = FineTuningConfig(**case["config"])
    layer = build(case, config)
    assert layer.scale == pytest.approx(case["scale"], rel=1e-10)
    assert_close(layer.weight_norm(), f32(case["expected"]["adapted_norm"]), **TOL)
    check_layer(layer, case, config)


def test_dora_gradients_match_golden_with_the_norm_detached():
    data = golden("dora")["gradients"]
    case = {"layer": "linear", "d_in": 4, "d_out": 3, "inputs": data["inputs"]}
    layer = build(case, FineTuningConfig(**data["config"]))
    layer.train()
    loss = 0.5 * ((layer(f32(data["inputs"]["x"])) - f32(data["inputs"]["y"])) ** 2).sum()
    loss.backward()
    assert loss.item() == pytest.approx(data["expected"]["loss"], rel=1e-5)
    assert_close(layer.lora_magnitude_vector.grad, f32(data["expected"]["grad_lora_magnitude_vector"]), **TOL)
    assert_close(layer.lora_B.weight.grad, f32(data["expected"]["grad_lora_B"]), **TOL)
    assert_close(layer.lora_A.weight.grad, f32(data["expected"]["grad_lora_A"]), **TOL)


def test_vera_shared_pair_is_the_seeded_draw_peft_makes():
    from peft.tuners.vera.model import _kaiming_init

    data = golden("vera")
    config = FineTuningConfig(**data["config"])
    shapes = [tuple(shape) for shape in data["target_shapes"].values()]
    pair = get_method("vera").create_shared(config, shapes)
    assert_close(pair.vera_A, f32(data["shared"]["vera_A"]), rtol=0, atol=0)
    assert_close(pair.vera_B, f32(data["shared"]["vera_B"]), rtol=0, atol=0)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    assert_close(_kaiming_init(tuple(pair.vera_A.shape), generator=generator), pair.vera_A, rtol=0, atol=0)
    assert_close(_kaiming_init(tuple(pair.vera_B.shape), generator=generator), pair.vera_B, rtol=0, atol=0)
    assert pair.vera_A.abs().max() <= data["shared"]["bound_A"]
    assert pair.vera_B.abs().max() <= data["shared"]["bound_B"]


@pytest.mark.parametrize("case", golden("vera")["cases"], ids=lambda c: c["name"])
def test_vera_layer_matches_golden(case):
    data = golden("vera")
    config = FineTuningConfig(**data["config"])
    shapes = [tuple(shape) for shape in data["target_shapes"].values()]
    shared = get_method("vera").create_shared(config, shapes)
    fresh = get_method("vera").create_layer(base_layer(case), "proj", config, shared)
    assert_close(fresh.vera_lambda_b, torch.full((case["d_out"],), data["init"]["vera_lambda_b"]))
    assert_close(fresh.vera_lambda_d, torch.full((config.lora_r,), data["init"]["vera_lambda_d"]))
    layer = build(case, config, shared)
    check_layer(layer, case, config, {"vera_A": shared.vera_A, "vera_B": shared.vera_B})


@pytest.mark.parametrize("case", golden("loraplus")["param_groups"],
                         ids=lambda c: f"ratio{c['config']['loraplus_lr_ratio']:g}")
def test_loraplus_param_groups_match_golden(case):
    model = FineTuningModel(OneLayer(nn.Linear(4, 3)), FineTuningConfig(**case["config"]))
    names = {id(p): n.removeprefix("base_model.") for n, p in model.named_parameters()}
    groups = model.param_groups(case["lr"], case["weight_decay"])
    got = [{"params": [names[id(p)] for p in g["params"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
           for g in groups]
    assert len(got) == len(case["expected_groups"])
    for group, want in zip(got, case["expected_groups"]):
        assert group["params"] == want["params"]
        assert group["lr"] == pytest.approx(want["lr"], rel=1e-10)
        assert group["weight_decay"] == want["weight_decay"]


def test_lora_fa_gradients_match_golden():
    data = golden("lora_fa")["gradients"]
    config = FineTuningConfig(**data["config"])
    case = {"layer": "linear", "d_in": 4, "d_out": 3, "inputs": data["inputs"]}
    layer = build(case, config)
    layer.train()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == data["expected"]["trainable"]
    x = f32(data["inputs"]["x"]).requires_grad_(True)
    loss = 0.5 * ((layer(x) - f32(data["inputs"]["y"])) ** 2).sum()
    loss.backward()
    assert loss.item() == pytest.approx(data["expected"]["loss"], rel=1e-5)
    assert layer.lora_A.weight.grad is None
    assert_close(layer.lora_B.weight.grad, f32(data["expected"]["grad_lora_B"]), **TOL)
    assert_close(x.grad, f32(data["expected"]["grad_x"]), **TOL)


def test_delta_lora_sgd_trajectory_matches_golden():
    data = golden("delta_lora")["trajectory"]
    config = FineTuningConfig(**data["config"])
    inputs, expected = data["inputs"], data["expected"]
    case = {"layer": "linear", "d_in": 4, "d_out": 3, "inputs": inputs}
    model = FineTuningModel(OneLayer(base_layer(case)), config)
    layer = model.adapter_layers["proj"]
    layer.load_adapter_state(adapter_state(inputs))
    optimizer = model.create_optimizer(lr=data["optimizer"]["lr"], optimizer_cls=torch.optim.SGD)
    x, y, w0 = f32(inputs["x"]), f32(inputs["y"]), f32(inputs["base_weight"])
    for record in expected["history"]:
        loss = 0.5 * ((model(x) - y) ** 2).sum()
        assert loss.item() == pytest.approx(record["loss"], rel=1e-4)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert_close(layer.lora_A.weight.detach(), f32(record["lora_A"]), **TRAJECTORY_TOL)
        assert_close(layer.lora_B.weight.detach(), f32(record["lora_B"]), **TRAJECTORY_TOL)
        with torch.no_grad():  # the paper's W_t, which ftserve never stores: W_0 + delta - s B_t A_t
            paper_w = w0 + layer.delta_weight() - layer.scale * layer.lora_B.weight @ layer.lora_A.weight
        assert_close(paper_w, f32(record["W"]), **TRAJECTORY_TOL)
    assert layer.started and model.steps_done == len(expected["history"])
    assert_close(layer.lora_A_start, f32(expected["lora_A_start"]), **TRAJECTORY_TOL)
    assert_close(layer.lora_B_start, f32(expected["lora_B_start"]), **TRAJECTORY_TOL)
    assert_close(f32(expected["W_T_minus_W_0"]), f32(expected["telescoped"]), **TOL)
    with torch.no_grad():
        assert_close(layer.delta_weight(), f32(expected["delta_weight"]), **TRAJECTORY_TOL)
        assert_close(model(x), f32(expected["h"]), **TRAJECTORY_TOL)
        factors = layer.lora_factors()
    assert factors.rank == expected["export"]["rank"]
    assert factors.scale == pytest.approx(expected["export"]["scale"], rel=1e-10)
    assert_close(factors.A, f32(expected["export"]["A"]), **TRAJECTORY_TOL)
    assert_close(factors.B, f32(expected["export"]["B"]), **TRAJECTORY_TOL)
