"""Tiny models, the fixed batches the tests feed them, and what the tests read off them."""

from __future__ import annotations

import torch
from torch import nn

from ftserve import FineTuningConfig, FineTuningModel
from ftserve.testing import random_adapter, tiny_gpt2, tiny_llama

FP32 = dict(atol=2e-5, rtol=1e-5)
IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))  # for the conftest-sized models

# A cheap "memorise these sequences" task: each row repeats a cycle, so every token has one successor.
TOY_IDS = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17] * 2, [40, 41, 42, 43, 44, 45, 46, 47] * 2])


def tiny_model(kind: str) -> nn.Module:
    """The conftest-sized model of ``kind``: Llama (vocab 1000, hidden 128) or GPT-2 (Conv1D, hidden 64)."""
    return tiny_llama() if kind == "llama" else tiny_gpt2()


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


def trained(base: nn.Module, settings: dict, seed: int = 0, targets="all-linear") -> FineTuningModel:
    """An adapter with random, non-zero tensors (LoRA's B starts at zero, which would hide bugs), in eval mode."""
    return random_adapter(base, FineTuningConfig(target_modules=targets, **settings), seed, std=0.05).eval()


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = TOY_IDS) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


@torch.no_grad()
def with_biases(model: nn.Module, seed: int = 5) -> nn.Module:
    """GPT-2 starts with zero biases, which would hide a bias scaled by mistake: give every one noise."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model
