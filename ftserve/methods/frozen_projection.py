"""``dropout(x) A^T`` for a frozen A (LoRA-FA's A, VeRA's shared A) that keeps neither ``x`` nor a dropout mask.

With A frozen, backward needs only ``dL/dx = dropout'(g A)``: A and the mask. Autograd would keep the mask (a
float per input element, from ``nn.Dropout`` on CPU); here the mask is drawn from a seed and drawn again from
the same seed in backward. It is drawn as raw random bits, 32 per element (int64 words from ``random_`` read
as int32 pairs), which is cheaper than ``bernoulli_``: that draws a double per element, one element at a
time. An element is dropped when its bits, read as a signed int32, reach
``round((1 - p) 2^32) - 2^31``, so it is kept with probability ``1 - p`` to within ``2^-32``; survivors are
scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def drop_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """True where dropout(p) zeroes an element: the same mask for the same shape, p, seed and device."""
    count = math.prod(shape)
    generator = torch.Generator(device=device).manual_seed(seed)
    words = torch.empty((count + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)  # the full 64-bit range: every bit uniform
    drop_from = min(round((1.0 - p) * 2**32) - 2**31, 2**31 - 1)
    return words.view(torch.int32)[:count].view(shape) >= drop_from


class _FrozenProjection(torch.autograd.Function):
    """``u = dropout(x) A^T`` with A frozen: keeps A and a seed; ``1 / (1 - p)`` is applied on the r-dim side
    (``u`` in forward, the incoming gradient in backward), so each way has one full-size pass besides the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, p: float, seed: int) -> Tensor:
        ctx.save_for_backward(A)
        ctx.p, ctx.seed, ctx.x_dtype = p, seed, x.dtype
        kept = x.masked_fill(drop_mask(x.shape, p, seed, x.device), 0)
        return F.linear(kept, A).mul_(1.0 / (1.0 - p))

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (A,) = ctx.saved_tensors
        # Under autocast the forward ran in low precision; backward runs without it, so align dtypes.
        grad_x = (grad.to(A.dtype) * (1.0 / (1.0 - ctx.p))) @ A
        grad_x.masked_fill_(drop_mask(grad_x.shape, ctx.p, ctx.seed, grad_x.device), 0)
        return grad_x.to(ctx.x_dtype), None, None, None


def frozen_projection(x: Tensor, A: Tensor, p: float) -> Tensor:
    """``dropout_p(x) A^T`` for a frozen ``A (r x d_in)``; p = 0 (or evaluation) is the plain product, for which
    autograd already keeps A alone. The seed comes from torch's global generator, so ``manual_seed`` repeats it."""
    if p == 0:
        return F.linear(x, A)
    seed = int(torch.randint(0, 2**62, ()).item())
    return _FrozenProjection.apply(x, A, p, seed)
