"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): LoRA with the projection-down matrix A frozen at init.

Forward and delta are LoRA's: ``h = W x + s B A dropout(x)``; only B trains, so ``delta W = s B A`` stays in the
row space of the initial A and the plain-LoRA export is the adapter itself.

The point of the method is activation memory: ``dL/dB = s dy^T (A x)`` needs only the r-dim ``A x``, not the
d_in-dim input. Autograd alone already skips ``x`` when A is frozen, but with dropout it would keep the dropout
mask (one byte per input element). ``_FrozenAProjection`` keeps ``A x`` and a dropout seed instead, and
regenerates the mask in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora import Lora, LoraLayer


def _dropout_mask(like: Tensor, p: float, seed: int) -> Tensor:
    generator = torch.Generator(device=like.device).manual_seed(seed)
    mask = torch.empty(like.shape, device=like.device, dtype=torch.float32)
    return mask.bernoulli_(1.0 - p, generator=generator).div_(1.0 - p).to(like.dtype)


class _FrozenAProjection(torch.autograd.Function):
    """``y = s * (dropout(x) A^T) B^T`` with A frozen; saves ``u = dropout(x) A^T`` (r-dim) and a seed."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, scale: float, p: float, seed: int) -> Tensor:
        if p > 0:
            x = x * _dropout_mask(x, p, seed)
        u = F.linear(x, A)
        ctx.save_for_backward(u, A, B)
        ctx.scale, ctx.p, ctx.seed, ctx.x_dtype = scale, p, seed, x.dtype
        return F.linear(u, B) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, A, B = ctx.saved_tensors
        # Under autocast the forward ran in low precision; backward runs without it, so align dtypes.
        grad, u = grad.to(B.dtype) * ctx.scale, u.to(B.dtype)
        grad_B = grad.reshape(-1, grad.shape[-1]).T @ u.reshape(-1, u.shape[-1]) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ B) @ A
            if ctx.p > 0:
                grad_x = grad_x * _dropout_mask(grad_x, ctx.p, ctx.seed)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_B, None, None, None


class LoraFALayer(LoraLayer):
    def __init__(self, base_layer, r, scale, dropout) -> None:
        super().__init__(base_layer, r, scale, dropout)
        self.lora_A.weight.requires_grad_(False)
        self.dropout_p = dropout

    def delta(self, x: Tensor) -> Tensor:
        p = self.dropout_p if self.training else 0.0
        seed = int(torch.randint(0, 2**62, ()).item()) if p > 0 else 0
        return _FrozenAProjection.apply(x, self.lora_A.weight, self.lora_B.weight, self.scale, p, seed)


class LoraFA(Lora):
    name = "lora-fa"
    layer_class = LoraFALayer


METHOD = LoraFA()
