"""Shared test utilities: small models, a fixed toy batch, randomised adapters, closed-form parameter counts.

Everything here is deterministic: every random draw goes through a seeded ``torch.Generator``, a seed the test sets, or
``ftserve.testing``'s seeded builders.
"""

from __future__ import annotations

import torch
from torch import nn

from ftserve.methods import METHODS as REGISTRY
from ftserve.testing import tiny_gpt2, tiny_llama

METHODS = tuple(REGISTRY)  # the built-in methods, as registered when the tests start

# A cheap "memorise these sequences" task: each row repeats a cycle, so every token has one successor.
TOY_IDS = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17] * 2, [40, 41, 42, 43, 44, 45, 46, 47] * 2])


def small_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Llama smaller than the conftest one (vocab 256, hidden 64), for tests that take many steps."""
    return tiny_llama(vocab_size=256, hidden=64, heads=2, intermediate=128, dtype=dtype)


def small_gpt2() -> nn.Module:
    """A GPT-2 with Conv1D projections (vocab 256, hidden 32)."""
    return tiny_gpt2(vocab_size=256, hidden=32)


# (builder, targets): Llama's down_proj and GPT-2's two c_proj have other input sizes than the rest, and
# GPT-2's c_attn another output size, so VeRA's shared pair is sliced differently per layer.
MODELS = {
    "llama": (small_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (small_gpt2, ["c_attn", "c_proj"]),
}


def target_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module whose name ends with a target, read off the weights of the bare model.

    nn.Linear stores (d_out, d_in); GPT-2's Conv1D stores (d_in, d_out).
    """
    shapes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            rows, cols = module.weight.shape
            shapes[name] = (rows, cols) if isinstance(module, nn.Linear) else (cols, rows)
    return shapes


def closed_form_trainable(method: str, r: int, shapes: dict[str, tuple[int, int]]) -> int:
    """LoRA / LoRA+ / Delta-LoRA: sum r (d_in + d_out); LoRA-FA: sum r d_out (A frozen); VeRA: sum (r + d_out)."""
    if method == "lora-fa":
        return sum(r * d_out for d_out, _ in shapes.values())
    if method == "vera":
        return sum(r + d_out for d_out, _ in shapes.values())
    return sum(r * (d_in + d_out) for d_out, d_in in shapes.values())


@torch.no_grad()
def randomise_adapter(model: nn.Module, seed: int, std: float = 0.1) -> None:
    """Fill every adapter tensor with seeded noise, so that B / lambda_b are no longer zero."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.adapter_parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * std)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """The guide's plain loop on one fixed batch; returns the loss of every step."""
    model.train()
    losses = []
    for _ in range(steps):
        outputs = model(input_ids=ids, labels=ids)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(outputs.loss.item())
    return losses


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = TOY_IDS) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def saved_activation_bytes(module: nn.Module, fn) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs, counted once per storage, parameters and
    buffers of ``module`` excluded."""
    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()  # kept alive while counting, so no saved storage is freed and its address reused
    total = sum(seen.values())
    del result
    return total
