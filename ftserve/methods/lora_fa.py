"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): LoRA with the projection-down matrix A frozen at init.

Forward and delta are LoRA's: ``h = W x + s B A dropout(x)``; only B trains, so ``delta W = s B A`` stays in the
row space of the initial A and the plain-LoRA export is the adapter itself.

The point of the method is activation memory: ``dL/dB = s dy^T (A x)`` needs only the r-dim ``A x``, not the
d_in-dim input. Autograd alone already skips ``x`` when A is frozen, but with dropout it would keep the dropout
mask (one byte per input element). ``_FrozenAProjection`` keeps a dropout seed instead and regenerates the mask
in backward; autograd keeps the r-dim ``A x`` for ``dL/dB``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lora import Lora, LoraLayer


def _keep_mask(like: Tensor, p: float, seed: int, dtype: torch.dtype) -> Tensor:
    """The 0/1 keep mask of dropout(p) in the shape of ``like``, drawn from ``seed``: the same mask each call
    with the same dtype (forward and backward both draw it in the input's dtype)."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.empty(like.shape, device=like.device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)


class _FrozenAProjection(torch.autograd.Function):
    """``u = dropout(x) A^T`` with A frozen: keeps only A and a dropout seed, and regenerates the mask in backward.

    ``B`` and the scale are applied outside, by autograd, which keeps ``u`` (r-dim) for ``dL/dB``. Dropout's
    ``1 / (1 - p)`` is applied on the r-dim side of the product (``u`` in forward, the incoming gradient in
    backward), so the full-size passes are the mask draw and one multiply each way.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, p: float, seed: int) -> Tensor:
        ctx.save_for_backward(A)
        ctx.p, ctx.seed, ctx.x_dtype = p, seed, x.dtype
        return F.linear(x * _keep_mask(x, p, seed, x.dtype), A).mul_(1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (A,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        # Under autocast the forward ran in low precision; backward runs without it, so align dtypes.
        grad_x = (grad.to(A.dtype) * (1.0 / (1.0 - ctx.p))) @ A
        grad_x.mul_(_keep_mask(grad_x, ctx.p, ctx.seed, ctx.x_dtype))
        return grad_x.to(ctx.x_dtype), None, None, None


class LoraFALayer(LoraLayer):
    def __init__(self, base_layer, r, scale, dropout) -> None:
        super().__init__(base_layer, r, scale, dropout)
        self.lora_A.weight.requires_grad_(False)
        self.dropout_p = dropout

    def project_down(self, x: Tensor) -> Tensor:
        if self.dropout_p == 0 or not self.training:
            return F.linear(x, self.lora_A.weight)  # A is frozen, so autograd keeps A, not x
        seed = int(torch.randint(0, 2**62, ()).item())
        return _FrozenAProjection.apply(x, self.lora_A.weight, self.dropout_p, seed)


class LoraFA(Lora):
    name = "lora-fa"
    title = "LoRA-FA"
    quickstart_settings = {"rank": 8, "lr": 1e-2, "real_lr": 1e-2}  # B alone learns: a larger step on SmolLM2
    layer_class = LoraFALayer


METHOD = LoraFA()
