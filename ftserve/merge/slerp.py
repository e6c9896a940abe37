"""Merge methods for full models, slerp's fold (methods.py has the math): two passes of per-row sums, then the
interpolation block by block."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .combine import Scratch, TensorFold
from .method_spec import ModelMergeMethod, TensorInputs

SLERP_DOT_THRESHOLD, SLERP_EPS = 0.9995, 1e-8  # mergekit's: nearly parallel inputs interpolate linearly


class SlerpFold(TensorFold):
    """mergekit's ``slerp`` from the base ``a`` to the other input ``b`` by ``t``, in fp32 over the whole tensor::

        n_a = ||a||, n_b = ||b|| (1 where <= eps);  dot = clamp(sum (a/n_a)(b/n_b), -1, 1);  theta = acos dot
        result = sin((1-t) theta)/sin theta a + sin(t theta)/sin theta b   (|dot| <= 0.9995)
                 (1-t) a + t b                                            (else)

    Pass 1 sums squares per row, pass 2 the normalized products per row (float64)."""

    transposed = False
    passes = 2

    def __init__(self, method: ModelMergeMethod, tensor: TensorInputs) -> None:
        self.tensor = tensor
        (self.other,) = [i for i in range(len(tensor.inputs)) if i != tensor.base_index]
        self.dtype = torch.float64 if tensor.math_dtype == torch.float64 else torch.float32
        self.t = torch.tensor([[method.param_value(tensor.shared, "t")]], dtype=self.dtype)
        self.stage = 0

    def _pair(self, weight: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        md, weight = self.tensor.math_dtype, weight.reshape(stop - start, -1)
        a = weight.to(md).to(self.dtype)
        b = self.tensor.inputs[self.other].rows(weight, start, stop).to(md).to(self.dtype)
        return a, b

    def scan(self, rows: Tensor, scratch: Scratch, start: int, stop: int) -> Any:
        a, b = self._pair(rows, start, stop)
        if self.stage == 0:
            return (torch.sum(a.double().square(), dim=1), torch.sum(b.double().square(), dim=1))
        return torch.sum(((a / self.norm_a) * (b / self.norm_b)).double(), dim=1)

    def gather(self, partials: Iterable[Any]) -> None:
        partials = list(partials)
        if self.stage == 0:
            self.norm_a, self.norm_b = (slerp_norm(torch.cat([p[k] for p in partials]), self.dtype) for k in (0, 1))
        else:
            self.coef_a, self.coef_b = slerp_coefficients(torch.cat(partials).sum(), self.t, self.dtype)
        self.stage += 1

    def block(self, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        a, b = self._pair(weight, start, stop)
        return (self.coef_a * a + self.coef_b * b).to(self.tensor.math_dtype)


def slerp_norm(row_squares: Tensor, dtype: torch.dtype) -> Tensor:
    """A whole tensor's norm from its rows' float64 sums of squares, in ``dtype``, 1 where it is <= eps."""
    norm = row_squares.sum().sqrt().to(dtype).reshape(1, 1)
    return torch.where(norm > SLERP_EPS, norm, 1)


def slerp_coefficients(dot: Tensor, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """slerp's two coefficients from the float64 dot product of the normalized inputs (SlerpFold)."""
    dot = dot.to(dtype).reshape(1, 1).clamp(-1, 1)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    return (torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta),
            torch.where(linear, t, torch.sin(t * theta) / sin_theta))
