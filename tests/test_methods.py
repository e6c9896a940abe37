"""The registered methods: a (case, model, config) matrix of generic checks, then each method's math with hand-placed
values, LoRA-FA's gradients and activation memory, and Delta-LoRA against a literal reference of the paper."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ftserve import FineTuningConfig, FineTuningModel, load_adapter, read_adapter
from ftserve.methods.frozen_projection import drop_mask
from ftserve.testing import random_adapter

from support.cases import CASE_IDS, CASES, Case, learning_rate, start_step
from support.models import MODELS, TOY_IDS, logits, small_llama, target_shapes
from support.training import saved_activation_bytes, train

R, ALPHA = 4, 8.0
STEPS = 200  # of the training check: enough for every method to lower the toy loss at its declared rate


def matrix_config(case: Case, targets: list[str], **changes) -> FineTuningConfig:
    """The case's settings with some dropout, as the method takes it: one that removes dropout (Delta-LoRA)
    sets it to 0 with a warning."""
    settings = dict(case.settings, target_modules=targets, lora_dropout=0.05, **start_step(case.settings["method"], 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FineTuningConfig(**{**settings, **changes})


# The matrix ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parameter_counts_equal_the_methods_closed_form(case):
    build, targets = MODELS[case.kind]
    base = build()
    shapes = target_shapes(base, targets)
    base_count = sum(p.numel() for p in base.parameters())
    config = matrix_config(case, targets)
    model = FineTuningModel(base, config)
    trainable, total = model.trainable_parameters()
    assert trainable == case.method.trainable_parameters(config, shapes)
    assert total == base_count + trainable + case.method.frozen_parameters(config, shapes)
    assert sorted(model.adapter_layers) == sorted(shapes)
    # A shared tensor (VeRA's pair) is one buffer for the whole model, never a parameter nor a copy per layer.
    buffers = [n.rsplit(".", 1)[-1] for n, _ in model.named_buffers(remove_duplicate=False)]
    assert all(buffers.count(key) == 1 for key in case.method.shared_keys)
    assert not any(n.rsplit(".", 1)[-1] in case.method.shared_keys for n, _ in model.named_parameters())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_training_lowers_loss_and_a_reload_gives_identical_logits(case, tmp_path):
    build, targets = MODELS[case.kind]
    torch.manual_seed(0)
    model = FineTuningModel(build(), matrix_config(case, targets))
    optimizer = model.create_optimizer(lr=learning_rate(case.settings["method"]))
    losses = train(model, optimizer, TOY_IDS, steps=STEPS)
    # The frozen lm_head of a random tiny model bounds how low the loss can go (~4.3 from ~5.5 here).
    assert sum(losses[-10:]) / 10 < losses[0] - 0.2, f"{case.id}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert model.steps_done == STEPS
    trained = logits(model)

    model.save_adapter(tmp_path / "adapter")
    # Trained past every start step: each module's folder holds every tensor the method saves (Delta-LoRA's
    # snapshot among them).
    saved = read_adapter(tmp_path / "adapter").modules
    assert all(set(case.method.saved_keys) <= set(state) for state in saved.values())
    for reloaded in (FineTuningModel.from_pretrained(build(), tmp_path / "adapter"),
                     load_adapter(build(), tmp_path / "adapter")):
        assert torch.equal(logits(reloaded), trained)
        assert reloaded.steps_done == STEPS
        assert all(not p.requires_grad for p in reloaded.parameters())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_layer_forward_is_base_plus_its_delta_and_its_lora_factors(case):
    """The forward (possibly fused), ``delta(x)`` and the served form are one function: ``s B' A' x``, or for a
    row-scaled form ``(diag(r) (W + s B' A') - W) x`` (the bias is not scaled). A method with a snapshot
    (Delta-LoRA) has it taken, and its factors moved on, by ``random_adapter``."""
    build, targets = MODELS[case.kind]
    model = random_adapter(build(), matrix_config(case, targets, lora_dropout=0.0), seed=1, std=0.1)
    generator = torch.Generator().manual_seed(3)
    for name, layer in model.adapter_layers.items():
        x = torch.randn(2, 3, layer.in_features, generator=generator)
        with torch.no_grad():
            added = layer(x) - layer.base_layer(x)
            factors = layer.lora_factors()
            if not case.method.row_scaled:  # a row-scaled method scales the base output: no additive delta(x)
                torch.testing.assert_close(added, layer.delta(x), rtol=1e-5, atol=1e-5, msg=name)
            served = factors.delta_weight(layer.base_weight() if factors.row_scaled else None)
            torch.testing.assert_close(added, x @ served.T, rtol=1e-5, atol=1e-5, msg=name)
        assert added.abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_new_adapter_leaves_the_output_unchanged_and_freezes_the_base(case):
    build, targets = MODELS[case.kind]
    reference = logits(build())
    model = FineTuningModel(build(), matrix_config(case, targets))
    assert torch.equal(logits(model), reference)  # B = 0 (LoRA family), b = 0 (VeRA)
    adapter = {id(p) for p in model.adapter_parameters()}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in adapter)


# LoRA and rsLoRA, by hand ----------------------------------------------------------------------------

class Pair(nn.Module):
    """Two bare layers: ``first`` (6 -> 5) and ``second`` (3 -> 7)."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = Conv1D(5, 6) if conv1d else nn.Linear(6, 5)
        self.second = nn.Linear(3, 7)
        nn.init.normal_(self.first.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x)


def _hand_placed_lora(layer) -> None:
    with torch.no_grad():
        layer.lora_A.weight.zero_()
        layer.lora_B.weight.zero_()
        layer.lora_A.weight[0, 4] = 1.0
        layer.lora_A.weight[1, 2] = 2.0
        layer.lora_B.weight[3, 0] = 5.0
        layer.lora_B.weight[1, 1] = -1.0


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora, scale", [(False, 3.0), (True, 6.0 / 2 ** 0.5)], ids=["alpha_r", "rslora"])
def test_lora_delta_is_scale_times_B_A(conv1d, use_rslora, scale):
    model = FineTuningModel(Pair(conv1d), FineTuningConfig(lora_r=2, lora_alpha=6, target_modules=["first"],
                                                           use_rslora=use_rslora))
    layer = model.adapter_layers["first"]
    _hand_placed_lora(layer)
    expected = torch.zeros(5, 6)
    expected[3, 4] = 5.0 * 1.0 * scale
    expected[1, 2] = -1.0 * 2.0 * scale
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-6, atol=0)
    x = torch.eye(6)  # row i is e_i: the delta's column i
    with torch.no_grad():
        torch.testing.assert_close(model(x) - layer.base_layer(x), expected.T, rtol=1e-6, atol=1e-6)
        base_out = layer.base_layer(x)
        model.fold()
        torch.testing.assert_close(model(x), base_out + expected.T, rtol=1e-6, atol=1e-6)
        model.unfold()
        torch.testing.assert_close(model(x) - layer.base_layer(x), expected.T, rtol=1e-6, atol=1e-6)


# VeRA, by hand ----------------------------------------------------------------------------------------

def test_vera_forward_is_b_times_B_slice_d_times_A_slice():
    model = FineTuningModel(Pair(), FineTuningConfig(method="vera", lora_r=3, target_modules=["first", "second"]))
    shared = model.shared
    assert shared.vera_A.shape == (3, 6) and shared.vera_B.shape == (7, 3)  # (r, max_in), (max_out, r)
    first, second = model.adapter_layers["first"], model.adapter_layers["second"]
    for layer in (first, second):  # one pair, the same storage, not a copy per layer
        assert layer.shared is shared
        assert layer.shared.vera_A.data_ptr() == shared.vera_A.data_ptr()
    with torch.no_grad():
        second.vera_lambda_b.copy_(torch.arange(1.0, 8.0))
        second.vera_lambda_d.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    A_l, B_l = shared.vera_A[:, :3], shared.vera_B[:7, :]
    expected = torch.arange(1.0, 8.0) * ((torch.tensor([2.0, -1.0, 0.5]) * (x @ A_l.T)) @ B_l.T)
    with torch.no_grad():
        torch.testing.assert_close(second(x) - second.base_layer(x), expected, rtol=1e-6, atol=1e-6)
    delta = torch.diag(torch.arange(1.0, 8.0)) @ B_l @ torch.diag(torch.tensor([2.0, -1.0, 0.5])) @ A_l
    torch.testing.assert_close(second.delta_weight(), delta, rtol=1e-6, atol=1e-6)
    factors = second.lora_factors()
    assert factors.scale == 1.0 and factors.A.shape == (3, 3) and factors.B.shape == (7, 3)
    # A change to the shared pair is seen by every layer: nothing was copied at construction.
    with torch.no_grad():
        shared.vera_A.mul_(2.0)
    torch.testing.assert_close(second.delta_weight(), 2.0 * delta, rtol=1e-6, atol=1e-6)


def test_vera_pair_depends_on_the_seed_and_is_saved(tmp_path):
    a = FineTuningModel(Pair(), FineTuningConfig(method="vera", lora_r=3, target_modules=["first"]))
    b = FineTuningModel(Pair(), FineTuningConfig(method="vera", lora_r=3, target_modules=["first"],
                                                 projection_prng_key=1))
    same = FineTuningModel(Pair(), FineTuningConfig(method="vera", lora_r=3, target_modules=["first"]))
    assert not torch.equal(a.shared.vera_A, b.shared.vera_A)
    assert torch.equal(a.shared.vera_A, same.shared.vera_A) and torch.equal(a.shared.vera_B, same.shared.vera_B)
    a.save_adapter(tmp_path / "vera")
    saved = load_file(str(tmp_path / "vera" / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.vera_A"], a.shared.vera_A)


@pytest.mark.parametrize("kind", list(MODELS))
def test_vera_pair_is_sized_to_the_largest_target(kind):
    build, targets = MODELS[kind]
    base = build()
    shapes = target_shapes(base, targets).values()
    model = FineTuningModel(base, FineTuningConfig(method="vera", lora_r=R, target_modules=targets))
    assert model.shared.vera_A.shape == (R, max(d_in for _, d_in in shapes))
    assert model.shared.vera_B.shape == (max(d_out for d_out, _ in shapes), R)


# LoRA+ -----------------------------------------------------------------------------------------------

def test_loraplus_gives_B_ratio_times_the_learning_rate_of_A():
    model = FineTuningModel(small_llama(), FineTuningConfig(method="lora+", lora_r=R, loraplus_lr_ratio=16.0,
                                                            target_modules=["q_proj", "v_proj"]))
    optimizer = model.create_optimizer(lr=1e-3, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert sorted(groups) == [1e-3, 1.6e-2]
    assert groups[1e-3] and all(".lora_A." in n for n in groups[1e-3])
    assert groups[1.6e-2] and all(".lora_B." in n for n in groups[1.6e-2])
    assert len(groups[1e-3]) == len(groups[1.6e-2]) == 4
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)


# LoRA-FA ---------------------------------------------------------------------------------------------

def test_lora_fa_never_trains_A():
    torch.manual_seed(0)
    model = FineTuningModel(small_llama(), FineTuningConfig(method="lora-fa", lora_r=R, lora_dropout=0.05,
                                                            target_modules=["q_proj", "v_proj"]))
    A0 = {n: layer.lora_A.weight.clone() for n, layer in model.adapter_layers.items()}
    train(model, model.create_optimizer(lr=1e-2), TOY_IDS, steps=5)
    for name, layer in model.adapter_layers.items():
        assert not layer.lora_A.weight.requires_grad and layer.lora_A.weight.grad is None
        assert torch.equal(layer.lora_A.weight, A0[name])
        assert layer.lora_B.weight.abs().sum() > 0


def _lora_fa_layer(d_in: int, d_out: int, r: int, dropout: float):
    base = nn.Sequential(nn.Linear(d_in, d_out))
    model = FineTuningModel(base, FineTuningConfig(method="lora-fa", lora_r=r, lora_alpha=2.0 * r,
                                                   lora_dropout=dropout, target_modules=["0"]))
    return model.adapter_layers["0"].train()


def test_lora_fa_backward_equals_plain_autograd_without_dropout():
    torch.manual_seed(0)
    layer = _lora_fa_layer(12, 10, 3, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 5, 12, requires_grad=True)
    upstream = torch.randn(2, 5, 10)
    layer(x).backward(upstream)

    x_ref = x.detach().clone().requires_grad_(True)
    B_ref = layer.lora_B.weight.detach().clone().requires_grad_(True)
    W, bias, A = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight.detach()
    (F.linear(x_ref, W, bias) + F.linear(F.linear(x_ref, A), B_ref) * 2.0).backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, B_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.lora_A.weight.grad is None


def test_lora_fa_backward_applies_the_forward_dropout_mask():
    """With W = 0 and A = B = I, s = 1, the layer's output is dropout(x) itself, so the forward reveals its mask;
    the backward must apply that same mask to grad_x, and grad_B must be upstream^T dropout(x)."""
    torch.manual_seed(0)
    d, p = 16, 0.5
    layer = _lora_fa_layer(d, d, d, dropout=p)
    with torch.no_grad():
        layer.scale = 1.0
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        layer.lora_A.weight.copy_(torch.eye(d))
        layer.lora_B.weight.copy_(torch.eye(d))
    x = (torch.rand(8, d) + 0.5).requires_grad_(True)  # no zeros, so y / x recovers the mask
    upstream = torch.randn(8, d)
    y = layer(x)
    y.backward(upstream)
    mask = (y / x).detach()
    kept = mask != 0
    assert 0 < kept.float().mean() < 1  # dropout is really on
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, upstream * mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, upstream.T @ y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_lora_fa_saves_no_full_size_input_for_backward(dropout):
    """One layer: LoRA keeps x (and the dropped x plus its mask); LoRA-FA keeps only the r-dim A x."""
    torch.manual_seed(0)
    x = torch.randn(8, 256, requires_grad=True)
    saved = {}
    for method in ("lora", "lora-fa"):
        base = nn.Sequential(nn.Linear(256, 256))
        model = FineTuningModel(base, FineTuningConfig(method=method, lora_r=4, lora_dropout=dropout,
                                                       target_modules=["0"])).train()
        saved[method] = saved_activation_bytes(model, lambda: model(x).sum())
    assert saved["lora"] >= x.nbytes
    assert saved["lora-fa"] <= 8 * 4 * 4  # (tokens x r) floats


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_lora_fa_keeps_less_activation_memory_than_lora_on_a_model(dropout):
    ids = torch.randint(4, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    saved = {}
    for method in ("lora", "lora-fa"):
        torch.manual_seed(0)
        model = FineTuningModel(small_llama(), FineTuningConfig(method=method, lora_r=R, lora_dropout=dropout,
                                                                target_modules=["q_proj", "v_proj", "down_proj"]))
        model.train()
        saved[method] = saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    # At least the inputs of the two down_proj layers (4 x 32 x 128 fp32 each) are not kept by LoRA-FA.
    assert saved["lora"] - saved["lora-fa"] >= 2 * 4 * 32 * 128 * 4


# Delta-LoRA against the paper --------------------------------------------------------------------------

class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class PaperDeltaLora:
    """Algorithm 1 of arXiv:2309.02411, literally, in float64: after the optimizer step of iteration t > K,
    ``W += lambda * s * (B_{t+1} A_{t+1} - B_t A_t)``, in place; W never gets a gradient. Plain SGD."""

    def __init__(self, stack: Stack, A_init: dict[str, torch.Tensor], s: float, ratio: float, K: int,
                 lr: float) -> None:
        self.layers = {name: getattr(stack, name) for name in ("first", "second")}
        self.W = {n: m.weight.detach().double().clone() for n, m in self.layers.items()}
        self.bias = {n: m.bias.detach().double().clone() for n, m in self.layers.items()}
        self.A = {n: A_init[n].detach().double().clone().requires_grad_(True) for n in self.layers}
        self.B = {n: torch.zeros(m.out_features, A_init[n].shape[0], dtype=torch.float64, requires_grad=True)
                  for n, m in self.layers.items()}
        self.s, self.ratio, self.K, self.lr, self.t = s, ratio, K, lr, 0

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        W, A, B = self.W[name], self.A[name], self.B[name]
        return x @ W.T + self.bias[name] + self.s * (x @ A.T) @ B.T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear("second", torch.tanh(self.linear("first", x.double())))

    def step(self) -> None:
        with torch.no_grad():
            before = {n: self.B[n] @ self.A[n] for n in self.layers}
            for n in self.layers:
                self.A[n] -= self.lr * self.A[n].grad
                self.B[n] -= self.lr * self.B[n].grad
                self.A[n].grad, self.B[n].grad = None, None
            if self.t > self.K:
                for n in self.layers:
                    self.W[n] += self.ratio * self.s * (self.B[n] @ self.A[n] - before[n])
        self.t += 1


def _delta_pair(K: int, paper_K: int, steps: int = 12, lr: float = 0.2):
    """Train ours (start step K) and the paper's algorithm (start step paper_K) side by side; return the
    per-step outputs and factors of both."""
    config = FineTuningConfig(method="delta-lora", lora_r=2, lora_alpha=4.0, target_modules=["first", "second"],
                              delta_start_step=K, delta_update_ratio=2.0)
    ours = FineTuningModel(Stack(), config)
    paper = PaperDeltaLora(Stack(), {n: l.lora_A.weight for n, l in ours.adapter_layers.items()}, s=2.0,
                           ratio=2.0, K=paper_K, lr=lr)
    optimizer = ours.create_optimizer(lr=lr, optimizer_cls=torch.optim.SGD)
    generator = torch.Generator().manual_seed(0)
    x, target = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    history = []
    for _ in range(steps):
        out_ours, out_paper = ours(x), paper(x)
        F.mse_loss(out_ours, target).backward()
        F.mse_loss(out_paper, target.double()).backward()
        optimizer.step()
        optimizer.zero_grad()
        paper.step()
        history.append((out_ours.detach(), out_paper.detach().float(),
                        {n: (l.lora_A.weight.detach().clone(), l.lora_B.weight.detach().clone())
                         for n, l in ours.adapter_layers.items()},
                        {n: (paper.A[n].detach().float(), paper.B[n].detach().float()) for n in paper.layers}))
    return ours, paper, x, history


def test_delta_lora_follows_the_papers_algorithm_step_by_step():
    ours, paper, x, history = _delta_pair(K=3, paper_K=3)
    for out_ours, out_paper, factors_ours, factors_paper in history:
        torch.testing.assert_close(out_ours, out_paper, rtol=1e-5, atol=1e-5)
        for name in factors_ours:
            torch.testing.assert_close(factors_ours[name][0], factors_paper[name][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(factors_ours[name][1], factors_paper[name][1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), paper(x).float(), rtol=1e-5, atol=1e-5)
    # The check has teeth: W really moved in the paper's run, and W_0 in ours did not.
    moved = max((paper.W[n] - l.base_layer.weight.double()).abs().max() for n, l in ours.adapter_layers.items())
    assert moved > 1e-2
    assert all(torch.equal(l.base_layer.weight, getattr(Stack(), n).weight) for n, l in ours.adapter_layers.items())


def test_delta_lora_starts_after_step_K_plus_1_not_K():
    """Starting W's updates one step early (t >= K, snapshot after step K) gives other outputs."""
    _, _, _, history = _delta_pair(K=3, paper_K=2)
    assert max((o - p).abs().max() for o, p, _, _ in history) > 1e-3


def test_delta_lora_snapshot_holds_the_factors_after_step_K_plus_1():
    ours, _, _, history = _delta_pair(K=3, paper_K=3, steps=8)
    for name, layer in ours.adapter_layers.items():
        state = layer.adapter_state()
        A_after, B_after = history[3][2][name]  # history[i] holds the factors after i + 1 steps
        assert torch.equal(state["lora_A_start.weight"], A_after)
        assert torch.equal(state["lora_B_start.weight"], B_after)
        assert not torch.equal(state["lora_B_start.weight"], history[2][2][name][1])

    config = FineTuningConfig(method="delta-lora", target_modules=["first"], delta_start_step=3)
    early = FineTuningModel(Stack(), config)
    optimizer = early.create_optimizer(lr=0.1, optimizer_cls=torch.optim.SGD)
    for step in range(1, 5):
        early(torch.ones(2, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        has_snapshot = "lora_A_start.weight" in early.adapter_layers["first"].adapter_state()
        assert has_snapshot == (step >= 4), f"after {step} steps"


def _delta_lora_trained_with(split: bool, rounds: int = 10, lr: float = 0.2) -> tuple[FineTuningModel, list]:
    """Delta-LoRA (start step 3) trained by plain SGD over A and B: one optimizer, or one for the A matrices and
    one for the B matrices stepped one after the other."""
    config = FineTuningConfig(method="delta-lora", lora_r=2, lora_alpha=4.0, target_modules=["first", "second"],
                              delta_start_step=3, delta_update_ratio=2.0)
    model = FineTuningModel(Stack(), config)
    A = [p for n, p in model.named_parameters() if "lora_A" in n]
    B = [p for n, p in model.named_parameters() if "lora_B" in n]
    optimizers = [torch.optim.SGD(A, lr=lr), torch.optim.SGD(B, lr=lr)] if split else [torch.optim.SGD(A + B, lr=lr)]
    for optimizer in optimizers:
        model.attach_training_rules(optimizer)
    generator = torch.Generator().manual_seed(0)
    x, target = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    counts = []
    for _ in range(rounds):
        F.mse_loss(model(x), target).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        counts.append(model.steps_done)
    return model, counts


def test_delta_lora_with_separate_A_and_B_optimizers_counts_each_round_once():
    """Two optimizers used to count every step twice: the snapshot came after half the steps, between A's update
    and B's, and W's schedule ran at double speed."""
    one, one_counts = _delta_lora_trained_with(split=False)
    two, two_counts = _delta_lora_trained_with(split=True)
    assert one_counts == two_counts == list(range(1, 11))
    for name, layer in one.adapter_layers.items():
        state, other = layer.adapter_state(), two.adapter_layers[name].adapter_state()
        assert set(state) == set(other) == {"lora_A.weight", "lora_B.weight", "lora_A_start.weight",
                                            "lora_B_start.weight"}
        for key in state:
            torch.testing.assert_close(other[key], state[key], rtol=1e-6, atol=1e-7, msg=f"{name}.{key}")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(two(x), one(x), rtol=1e-6, atol=1e-7)


def test_a_replaced_optimizer_stops_holding_back_the_step_count_once_collected():
    model = FineTuningModel(Stack(), FineTuningConfig(method="lora", target_modules=["first"]))

    def step(optimizer) -> None:
        model(torch.ones(2, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    first = model.create_optimizer(lr=0.1, optimizer_cls=torch.optim.SGD)
    step(first)
    step(first)
    del first
    gc.collect()
    second = model.create_optimizer(lr=0.1, optimizer_cls=torch.optim.SGD)
    model.attach_training_rules(second)  # attaching twice still counts once
    for expected in (3, 4, 5):
        step(second)
        assert model.steps_done == expected


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_delta_lora_base_plus_exported_rank_2r_lora_reproduces_the_logits(kind):
    build, targets = MODELS[kind]
    torch.manual_seed(0)
    model = FineTuningModel(build(), FineTuningConfig(method="delta-lora", lora_r=R, lora_alpha=ALPHA,
                                                      target_modules=targets, delta_start_step=2))
    train(model, model.create_optimizer(lr=2e-2), TOY_IDS, steps=8)
    expected = logits(model)
    factors = model.lora_factors()
    assert {f.rank for f in factors.values()} == {2 * R}
    base = build()
    with torch.no_grad():
        for name, f in factors.items():
            weight = base.get_submodule(name).weight
            weight += f.delta_weight().T if kind == "gpt2" else f.delta_weight()
    assert (logits(base) - logits(build())).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(logits(base), expected, rtol=1e-5, atol=1e-5)


def test_delta_lora_stays_exact_on_a_bf16_base():
    torch.manual_seed(0)
    base = small_llama(dtype=torch.bfloat16)
    W0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = FineTuningModel(base, FineTuningConfig(method="delta-lora", lora_r=R, lora_alpha=ALPHA,
                                                   target_modules=["q_proj", "v_proj"], delta_start_step=1))
    train(model, model.create_optimizer(lr=2e-2), TOY_IDS, steps=6)
    for name, param in model.base_model.named_parameters():
        if ".lora_" not in name:
            assert param.dtype == torch.bfloat16
            assert torch.equal(param, W0[name.replace(".base_layer", "")]), name
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    for layer in model.adapter_layers.values():
        state = layer.adapter_state()
        assert {t.dtype for t in state.values()} == {torch.float32} and len(state) == 4
        A, B = state["lora_A.weight"].double(), state["lora_B.weight"].double()
        A_K, B_K = state["lora_A_start.weight"].double(), state["lora_B_start.weight"].double()
        deployed = layer.scale * (3.0 * B @ A - 2.0 * B_K @ A_K)  # s ((1 + lambda) B A - lambda B_K' A_K')
        assert deployed.abs().max() > 1e-4
        torch.testing.assert_close(layer.delta_weight().double(), deployed, rtol=1e-5, atol=1e-7)
        with torch.no_grad():  # the bf16 forward is W_0 x plus the fp32 correction, rounded to bf16 (~1 ulp)
            xb = x.to(torch.bfloat16)
            expected = (layer.base_layer(xb).double() + xb.double() @ deployed.T).to(torch.bfloat16)
            torch.testing.assert_close(layer(xb), expected, rtol=1.6e-2, atol=1e-2)


# Dropout under a frozen A (LoRA-FA, VeRA) -----------------------------------------------------------------

def test_frozen_projection_mask_keeps_one_minus_p_and_repeats_from_its_seed():
    shape = torch.Size([64, 1000])
    mask = drop_mask(shape, 0.25, seed=7, device=torch.device("cpu"))
    assert mask.shape == shape and mask.dtype == torch.bool
    # 64000 Bernoulli(0.25) draws: the standard deviation of the dropped fraction is about 0.0017.
    assert abs(mask.float().mean().item() - 0.25) < 0.01
    assert torch.equal(mask, drop_mask(shape, 0.25, seed=7, device=torch.device("cpu")))
    assert not torch.equal(mask, drop_mask(shape, 0.25, seed=8, device=torch.device("cpu")))
    assert not drop_mask(shape, 1e-12, seed=7, device=torch.device("cpu")).any()


def test_vera_with_dropout_saves_no_full_size_input_and_backward_uses_the_forward_mask():
    torch.manual_seed(0)
    d = 256
    model = FineTuningModel(nn.Sequential(nn.Linear(d, d)), FineTuningConfig(method="vera", lora_r=4, lora_dropout=0.5,
                                                                             target_modules=["0"])).train()
    layer = model.adapter_layers["0"]
    with torch.no_grad():
        layer.vera_lambda_b.fill_(1.0)
    x = (torch.rand(8, d) + 0.5).requires_grad_(True)
    assert saved_activation_bytes(model, lambda: model(x).sum()) <= 8 * 4 * 4 * 2 + 8 * d * 4  # r-dim u, v; B v
    torch.manual_seed(3)
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(3)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        seed = int(torch.randint(0, 2**62, ()).item())  # the seed the layer drew
    kept = ~drop_mask(x.shape, 0.5, seed, x.device)
    A, B = layer.shared.slices(d, d, x.device, x.dtype)
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    ref = F.linear(x_ref, W, bias) + F.linear(layer.vera_lambda_d.detach() * F.linear(x_ref * kept * 2.0, A), B)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
