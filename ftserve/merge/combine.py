"""Merge, combining: how the deltas of the adapters that target one weight become one, tensor by tensor.

A ``Combiner`` is given, per output tensor, the adapters targeting it as ``Part``s (merge weight ``w_k``, fp32
factors ``f_k``) and whether the tensor is stored transposed (GPT-2's ``Conv1D`` stores ``W (d_out x d_in)`` as
``(d_in, d_out)``). It returns that tensor's ``TensorFold``: the work that ``write.py`` drives over blocks of
stored rows, and that ``verify.py`` runs over the whole tensor (``fold_tensor``). A fold may ask for a first
pass over every block before the folding pass, for what spans the whole tensor: a magnitude threshold per tensor
(TIES), or the output-row norms of a row-scaled form stored transposed, where each stored block holds a slice
of every output row. A fold built on ``DenseFold`` gets each adapter's dense delta over a block. Memory stays
bounded by one block's rows plus what the first pass keeps (O(d_out)).

The weighted sum, ``WeightedSum``::

    W' = W + sum_k w_k Delta_k,     Delta_k = f_k.delta_weight(W)
    plain f_k:                      Delta_k = s_k B_k A_k
    row-scaled f_k (DoRA's form):   Delta_k = diag(r_k) (W + s_k B_k A_k) - W,   r_k = m_k / ||W + s_k B_k A_k||_row

Plain parts together are one LoRA of rank ``sum r_k``: ``B_cat @ A_cat`` with ``B_cat = [w_1 s_1 B_1, ...]`` and
``A_cat = [A_1; ...]``, folded as one GEMM. One plain adapter keeps PEFT's order of operations, ``W += (B @ A) *
(w s)`` with fp32 factors, computed in fp32 and rounded once, so the result is PEFT's bit for bit.

A row-scaled part is merged only on its own (the plan refuses a recipe that mixes it with other adapters:
``ROW_SCALE_DOES_NOT_ADD``). With weight ``w`` it interpolates between the base and the adapted weight::

    W' = W + w (diag(r) (W + s B A) - W) = (1 - w) W + w diag(r) (W + s B A)

so ``w = 0`` is the base, ``w = 1`` is ``diag(r) (W + s B A)`` itself (computed as such, with no round trip
through ``- W + W``), and each weight moves along the line from ``W`` to the adapted weight, as task arithmetic
scales a fine-tuned model's task vector. It is not the row-scaled adapter with a scaled ``B A`` or a scaled ``m``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from ..methods import LoraFactors

# ``scratch(name, shape, dtype=fp32)``: a reusable work tensor of that shape, one per name and thread; its values
# are whatever the last user left. write.py keeps the name "weight" for the block it hands over.
Scratch = Callable[..., Tensor]

# Why a row-scaled adapter merges only on its own, for the plan's refusal.
ROW_SCALE_DOES_NOT_ADD = ("its row scale m / ||W + s B A||_row is a norm of its own adapted weight, and such norms do "
                          "not add across adapters, so a weighted sum with other adapters has no meaning of its own")


class ZeroNormRowError(CheckpointError):
    """A row-scaled adapter whose adapted weight has a row of norm zero on this base."""


@dataclass
class Part:
    """One adapter on one tensor: its merge weight and its served form, in fp32."""

    weight: float
    factors: LoraFactors

    @classmethod
    def of(cls, weight: float, factors: LoraFactors) -> "Part":
        """The part with its factors in fp32, as every fold computes."""
        magnitude = None if factors.magnitude is None else factors.magnitude.float()
        return cls(weight, dataclasses.replace(factors, A=factors.A.float(), B=factors.B.float(), magnitude=magnitude))


class TensorFold:
    """One output tensor's fold, driven over blocks of stored rows ``[start, stop)``, each given in fp32.

    A fold makes ``passes`` first passes over the tensor before folding it: in each, ``scan`` sees every block
    (any order, any thread) and ``gather`` receives the scans' results once, in block order (a fold counts its
    own passes: an exact magnitude threshold, for instance, narrows a histogram pass by pass). ``block`` then
    returns each block's folded rows (any order, any thread)."""

    transposed: bool
    passes: int = 0

    def scan(self, rows: Tensor, scratch: Scratch, start: int, stop: int) -> Any:
        raise NotImplementedError

    def gather(self, partials: Iterable[Any]) -> None:
        raise NotImplementedError

    def block(self, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the folded tensor (fp32, or the math dtype of a model merge), from the same
        rows of the stored one (``weight``, which may be updated in place and returned, as may a ``scratch``
        tensor: the caller copies the result before this thread's next block)."""
        raise NotImplementedError


class Combiner:
    """How several adapters' deltas on one tensor are combined; see the module docstring."""

    name: str = ""

    def fold(self, parts: list[Part], transposed: bool) -> TensorFold:
        raise NotImplementedError


def fold_tensor(fold: TensorFold, stored: Tensor) -> Tensor:
    """The whole folded tensor in fp32 from the stored one, both passes over it as one block (small models)."""
    weight = stored.float().clone()

    def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.empty(shape, dtype=dtype)

    for _ in range(fold.passes):
        fold.gather([fold.scan(weight, scratch, 0, len(weight))])
    return fold.block(weight, scratch, 0, len(weight))


@dataclass
class LowRank(TensorFold):
    """``W' = W + (B @ A) * scale``, transposed for Conv1D.

    When ``scale`` is a power of two, ``(B @ A) * scale = (scale B) @ A`` exactly (scaling by 2^k commutes
    with rounding), so B is scaled once and the product accumulated onto W in one GEMM (``addmm_``: the
    product is rounded, then added; benchmarks/merge.py checks the result bit for bit against PEFT)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scale: float
    transposed: bool

    def __post_init__(self) -> None:
        if self.scale != 1.0 and math.frexp(self.scale)[0] == 0.5:
            self.B, self.scale = self.B * self.scale, 1.0

    def block(self, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        if not self.transposed and self.scale == 1.0:
            return weight.addmm_(self.B[start:stop], self.A)
        if self.transposed:
            delta = torch.mm(self.B, self.A[:, start:stop], out=scratch("delta", (len(self.B), stop - start)))
        else:
            delta = torch.mm(self.B[start:stop], self.A, out=scratch("delta", (stop - start, self.A.shape[1])))
        if self.scale != 1.0:
            delta.mul_(self.scale)
        return weight.add_(delta.t() if self.transposed else delta)


class WeightedSum(Combiner):
    """``W' = W + sum_k w_k Delta_k`` (the module docstring): the linear merge and task arithmetic."""

    name = "weighted sum"

    def fold(self, parts: list[Part], transposed: bool) -> TensorFold:
        if any(p.factors.row_scaled for p in parts):
            if len(parts) > 1:
                raise ConfigError(f"a row-scaled adapter cannot be summed with {len(parts) - 1} other(s) on one "
                                  f"weight: {ROW_SCALE_DOES_NOT_ADD}")
            return RowScaledSum(parts, transposed)
        return low_rank_sum(parts, transposed)


def low_rank_sum(parts: list[Part], transposed: bool) -> LowRank:
    """``sum_k w_k s_k B_k A_k`` of plain parts as one LowRank (the module docstring)."""
    if len(parts) == 1:
        (part,) = parts
        return LowRank(part.factors.A, part.factors.B, part.factors.scale * part.weight, transposed)
    A = torch.cat([p.factors.A for p in parts], dim=0)
    B = torch.cat([p.factors.B * (p.weight * p.factors.scale) for p in parts], dim=1)
    return LowRank(A, B, 1.0, transposed)


class DenseFold(TensorFold):
    """A fold that works on each part's dense delta over a block of stored rows (``delta``): for a rule that is
    not linear in the factors (a TIES or DARE combiner), and for row-scaled forms.

    ``Delta_k`` is ``s_k B_k A_k`` for a plain part and ``diag(r_k) V_k - W`` for a row-scaled one, ``V_k = W +
    s_k B_k A_k``. Stored as ``W``, a block holds whole output rows and ``r_k`` comes from the block itself.
    Stored transposed, a block holds a slice of every output row: the first pass sums the squares of each output
    row's entries block by block (in float64), and ``gather`` turns the sums into ``r_k``. A subclass with a
    first pass of its own extends ``scan`` and ``gather``."""

    def __init__(self, parts: list[Part], transposed: bool) -> None:
        self.parts, self.transposed = parts, transposed
        self.scaled = [k for k, p in enumerate(parts) if p.factors.row_scaled]
        self.passes = int(transposed and bool(self.scaled))
        self.row_scales: dict[int, Tensor] = {}  # r_k (d_out,) of a transposed tensor, after the first pass

    def scan(self, rows: Tensor, scratch: Scratch, start: int, stop: int) -> Any:
        if not self.transposed:
            return []
        return [_squares(self.scaled_sum(k, rows, scratch, start, stop), dim=0) for k in self.scaled]

    def gather(self, partials: Iterable[Any]) -> None:
        totals: list[Tensor] = []
        for partial in partials:
            totals = [a + b for a, b in zip(totals, partial)] if totals else partial
        self.row_scales = {k: self.parts[k].factors.magnitude / _nonzero(total.sqrt().float(), 0)
                           for k, total in zip(self.scaled, totals)}

    def delta(self, k: int, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of ``Delta_k`` as stored, from the same rows of ``W`` (``weight``), in scratch
        that the next call reuses."""
        f = self.parts[k].factors
        if f.row_scaled:
            summed = self.scaled_sum(k, weight, scratch, start, stop)
            return summed.mul_(self.row_scale(k, summed, start, stop)).sub_(weight)
        out = scratch("delta", tuple(weight.shape))
        if self.transposed:
            return torch.mm(f.A[:, start:stop].t(), f.B.t(), out=out).mul_(f.scale)
        return torch.mm(f.B[start:stop], f.A, out=out).mul_(f.scale)

    def scaled_sum(self, k: int, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of ``V_k = W + s_k B_k A_k`` as stored, in scratch that the next call reuses.

        In PEFT's order, ``W + (B @ A) * s`` (each step rounded in fp32), as its DoRA merge computes it."""
        f, out = self.parts[k].factors, scratch("summed", tuple(weight.shape))
        if self.transposed:
            out = torch.mm(f.A[:, start:stop].t(), f.B.t(), out=out)
        else:
            out = torch.mm(f.B[start:stop], f.A, out=out)
        return out.mul_(f.scale).add_(weight)

    def row_scale(self, k: int, summed: Tensor, start: int, stop: int) -> Tensor:
        """``r_k`` shaped to multiply the stored rows of ``V_k`` (``summed``): a column for W, a row for its
        transpose. Stored as W, each row's norm is PEFT's (``torch.linalg.norm`` in fp32), so that a DoRA merge
        of a ``nn.Linear`` is PEFT's bit for bit."""
        if self.transposed:
            return self.row_scales[k][None, :]
        norms = _nonzero(torch.linalg.vector_norm(summed, dim=1), start)
        return (self.parts[k].factors.magnitude[start:stop] / norms)[:, None]


class RowScaledSum(DenseFold):
    """The weighted sum of one row-scaled part, ``W + w (diag(r) (W + s B A) - W)`` (the module docstring)."""

    def block(self, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        (part,) = self.parts
        if part.weight == 1.0:
            summed = self.scaled_sum(0, weight, scratch, start, stop)
            return torch.mul(summed, self.row_scale(0, summed, start, stop), out=weight)
        return weight.add_(self.delta(0, weight, scratch, start, stop), alpha=part.weight)


def _nonzero(norms: Tensor, first_row: int) -> Tensor:
    """``norms`` (of output rows ``first_row`` on), or a ZeroNormRowError naming the first that is zero: its row
    scale ``m / ||W + s B A||`` would divide by zero and write inf into the merged weight."""
    zero = torch.nonzero(norms == 0).flatten()
    if len(zero):
        raise ZeroNormRowError(f"output row {first_row + int(zero[0])} of W + s B A has norm 0 ({len(zero)} such "
                               f"row(s)), so the row scale m / ||W + s B A|| divides by zero; the adapter does not "
                               f"fit this base weight")
    return norms


def _squares(rows: Tensor, dim: int) -> Tensor:
    """Sum of squares along ``dim``, accumulated in float64, so that a norm summed block by block (a transposed
    tensor) loses nothing to the split."""
    return torch.sum(rows.square(), dim=dim, dtype=torch.float64)
