"""DoRA (ftserve/methods/dora.py) against PEFT's DoRA as the oracle: the same logits and gradients from the same
tensors, both ways through the files, with rsLoRA and dropout; identity at init; the norm detached; and bad
input (a magnitude of the wrong length, NaN in it, a zero-norm row, use_dora on a method that cannot carry it),
each refused in one line with nothing written."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ftserve import FineTuningConfig, FineTuningModel, load_adapter, read_adapter
from ftserve.errors import AdapterFileError, ConfigError
from ftserve.testing import randomise_adapter

from support.models import MODELS, TOY_IDS, logits, with_biases

# fp32: the two forwards compute the same sums in another order (our norm by the expanded form, PEFT's on the
# dense W + s B A), so they agree to a few float32 ulps of the largest values.
FP32 = dict(rtol=1e-5, atol=1e-5)
RANK, ALPHA = 4, 8


def base_model(kind: str) -> nn.Module:
    return with_biases(MODELS[kind][0]())


@torch.no_grad()
def spread(model: FineTuningModel, seed: int) -> None:
    """Random factors, and each magnitude ``||W + s B A||_row`` times 1 +- 0.3, so r differs from one per row."""
    randomise_adapter(model, seed, std=0.3, fan_in=True)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.adapter_layers.values():
        noise = torch.rand(layer.out_features, generator=generator) * 0.6 - 0.3
        layer.lora_magnitude_vector.copy_(layer.weight_norm() * (1 + noise))


def ours(kind: str, seed: int = 0, **settings) -> FineTuningModel:
    config = FineTuningConfig(method="dora", lora_r=RANK, lora_alpha=ALPHA, target_modules=MODELS[kind][1],
                              **settings)
    model = FineTuningModel(base_model(kind), config)
    spread(model, seed)
    return model


def peft_copy(model: FineTuningModel, kind: str, path) -> nn.Module:
    """PEFT's DoRA with our model's tensors, read from our folder, trainable."""
    model.save_adapter(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT loads our folder without a warning
        return PeftModel.from_pretrained(base_model(kind), path, is_trainable=True)


def loss_and_grads(model: nn.Module, training: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits on the toy batch and every adapter tensor's gradient of the LM loss, keyed
    ``<module>.<PEFT suffix>``; in eval mode unless ``training`` (dropout on, GPT-2's own too)."""
    model.train(training)
    model.zero_grad()
    out = model(input_ids=TOY_IDS, labels=TOY_IDS)
    out.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        module = re.search(r"(layers|h)\.\d+\..*", name.replace(".default", "")).group(0)
        grads[module.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
              .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = param.grad
    return out.logits.detach(), grads


@pytest.mark.parametrize("settings", [{}, {"use_rslora": True}], ids=["alpha-over-r", "rslora"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_same_logits_and_gradients_as_peft_from_the_same_tensors(kind, settings, tmp_path):
    """Gradients of A, B and m equal PEFT's, whose norm is detached: a gradient through the norm would change
    those of B and m (tested by name below too)."""
    model = ours(kind, **settings)
    peft_model = peft_copy(model, kind, tmp_path / "adapter")
    ours_logits, ours_grads = loss_and_grads(model)
    peft_logits, peft_grads = loss_and_grads(peft_model)
    torch.testing.assert_close(ours_logits, peft_logits, **FP32)
    assert set(ours_grads) == set(peft_grads) and len(ours_grads) == 3 * len(model.adapter_layers)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_dropout_in_training_draws_the_same_masks_and_gives_peft_s_logits(kind, tmp_path):
    """PEFT rescales ``W dropout(x)`` with dropout on; the same seed gives both models the same masks."""
    model = ours(kind, lora_dropout=0.3)
    peft_model = peft_copy(model, kind, tmp_path / "adapter")
    torch.manual_seed(7)
    ours_logits, ours_grads = loss_and_grads(model, training=True)
    torch.manual_seed(7)
    peft_logits, peft_grads = loss_and_grads(peft_model, training=True)
    torch.testing.assert_close(ours_logits, peft_logits, **FP32)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_norm_is_detached_its_gradient_would_change_m_s():
    """dL/dm = sum over tokens of grad_out * (W x + s B A x) / ||W + s B A||: nothing from the norm's own
    dependence on m's row (there is none) nor from B through the norm."""
    model = ours("llama")
    layer = next(iter(model.adapter_layers.values()))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    layer.train()
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * grad_out).sum().backward()
    with torch.no_grad():
        adapted = layer.base_weight() + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
        expected = (grad_out * (x @ adapted.T)).sum(0) / adapted.norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, expected, **FP32)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_new_adapter_is_the_identity(kind):
    base_logits = logits(base_model(kind))
    config = FineTuningConfig(method="dora", lora_r=RANK, target_modules=MODELS[kind][1])
    model = FineTuningModel(base_model(kind), config)
    torch.testing.assert_close(logits(model), base_logits, **FP32)
    for layer in model.adapter_layers.values():
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_weight().norm(dim=1), **FP32)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_trained_dora_loads_as_method_dora_with_peft_s_logits(kind, tmp_path):
    torch.manual_seed(0)
    targets = MODELS[kind][1]
    peft_model = get_peft_model(base_model(kind), LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True,
                                                             target_modules=targets))
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(input_ids=TOY_IDS, labels=TOY_IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(base_model(kind), tmp_path / "peft")
    assert loaded.config.method == "dora" and read_adapter(tmp_path / "peft").config.method == "dora"
    torch.testing.assert_close(logits(loaded), logits(peft_model), **FP32)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_saved_folder_is_peft_s_dora_and_reloads_exactly(kind, tmp_path):
    model = ours(kind)
    model.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    loaded = load_adapter(base_model(kind), tmp_path / "adapter")
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_inspect_shows_a_dora_adapter_as_row_scaled_and_not_for_vllm(tmp_path):
    from click.testing import CliRunner

    from ftserve.cli import main

    ours("llama").save_adapter(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["method"] == "dora" and info["peft_type"] == "LORA" and info["form"].startswith("row-scaled")
    assert info["vllm"].startswith("no: a DoRA adapter (method dora) scales each output row")


# Bad input ---------------------------------------------------------------------------------------------

def edited_folder(tmp_path: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter"
    ours("llama").save_adapter(path)
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def first_magnitude(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith("lora_magnitude_vector"))


def test_a_magnitude_of_the_wrong_length_is_refused_in_one_line(tmp_path):
    def shorten(tensors):
        key = first_magnitude(tensors)
        tensors[key] = tensors[key][:-1].clone()

    path = edited_folder(tmp_path, shorten)
    for load in (lambda: read_adapter(path).lora_factors(), lambda: load_adapter(base_model("llama"), path)):
        with pytest.raises(AdapterFileError, match=r"lora_magnitude_vector has shape \(\d+,\)") as caught:
            load()
        assert "\n" not in str(caught.value)


def test_nan_in_the_magnitude_is_refused_at_load(tmp_path):
    def poison(tensors):
        tensors[first_magnitude(tensors)][2] = float("nan")

    path = edited_folder(tmp_path, poison)
    base = base_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterFileError, match="magnitude vector holds 1 NaN or inf value") as caught:
        load_adapter(base, path)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not any(type(m).__name__ == "DoraLayer" for m in base.modules())


def test_a_zero_norm_row_is_refused_at_load_and_at_fold(tmp_path):
    """Row 3 of W + s B A all zero: r = m / 0. PEFT would compute inf and NaN."""
    model = ours("llama")
    name, layer = next(iter(model.adapter_layers.items()))
    with torch.no_grad():
        layer.base_layer.weight[3] = 0
        layer.lora_B.weight[3] = 0
    with pytest.raises(ValueError, match=rf"{name}: row 3 of W \+ s B A has norm 0") as caught:
        model.fold()
    assert "\n" not in str(caught.value) and not layer.folded
    layer.base_layer.weight.data[3] = 1.0
    model.save_adapter(tmp_path / "adapter")
    base = base_model("llama")
    base.get_submodule(name).weight.data[3] = 0
    with pytest.raises(AdapterFileError, match=rf"{name}: row 3 of W \+ s B A has norm 0"):
        load_adapter(base, tmp_path / "adapter")


def test_use_dora_on_a_method_that_cannot_carry_it_is_refused_in_one_line(tmp_path):
    from ftserve.testing import save_random_adapter

    for method in ("vera", "lora"):
        path = save_random_adapter(MODELS["llama"][0](), method, tmp_path / method)
        config_file = path / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
        with pytest.raises(AdapterFileError, match="sets use_dora: true, which a .* cannot carry; only dora") as caught:
            read_adapter(path)
        assert "\n" not in str(caught.value)
    peft_vera = {"peft_type": "VERA", "r": 8, "use_dora": True}
    with pytest.raises(ConfigError, match="which a VeRA adapter"):
        FineTuningConfig.from_peft_dict(peft_vera)
