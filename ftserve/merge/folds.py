"""Merge methods for full models, their folds: each method's arithmetic (methods.py) over blocks of rows.

The task-vector methods are one fold (``TaskVectorFold``, mergekit's generalized task arithmetic): each a choice
of sparsification and of the sign election. Where the whole tensor matters (a magnitude threshold, a rescale
sum, slerp's norms and angle) a fold asks write.py for first passes (combine.TensorFold), keeping O(rows) or
O(histogram bins) between passes; sparsify.py says how thresholds stay exact and masks reproducible. A fold
holds a few blocks of each input at a time, never a whole tensor (``reference_merge`` does, for verify), with
two exceptions: a top-k cut gathers one input's magnitude keys (a 16-bit key per element of a 16-bit tensor) to
keep mergekit's ties, and a DARE mask drawn in the first pass is kept as bits (one per element and input) for the
fold. Slerp's fold is slerp.py's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from ..errors import ConfigError
from .combine import Scratch, TensorFold
from .introsort import release_freed_memory
from .method_spec import ModelMergeMethod, TensorInputs, work_dtype
from .sparsify import (Bound, RankSearch, key_bits, key_passes, l1_scale, magnitude_keys, pack_bits, row_l1,
                       top_k_as_sorted, uniforms, unpack_bits)


def _md(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class LinearFold(TensorFold):
    """mergekit's ``linear``: in fp32 (fp64 for fp64 inputs), ``addcmul`` input by input, then divided by the sum
    of the weights (normalize), cast back to the math dtype."""

    transposed = False

    def __init__(self, method: ModelMergeMethod, tensor: TensorInputs) -> None:
        self.tensor, md = tensor, tensor.math_dtype
        self.dtype = torch.float64 if md == torch.float64 else torch.float32
        weights = torch.tensor([[method.param_value(p, "weight") for p in tensor.params]], dtype=self.dtype)
        self.coefficients = [w.reshape(1, 1) for w in weights.unbind(1)]
        self.denominator = weights.sum(dim=1).reshape(1, 1) if method.param_value(tensor.shared, "normalize") \
            else None

    def block(self, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        t, md, weight = self.tensor, self.tensor.math_dtype, weight.reshape(stop - start, -1)
        result = torch.zeros((stop - start, t.cols), dtype=self.dtype)
        for rows, coefficient in zip(t.inputs, self.coefficients):
            result.addcmul_(_md(rows.rows(weight, start, stop), md), coefficient)
        if self.denominator is not None:
            result.div_(self.denominator)
        return result.to(md)


@dataclass
class _Sparsifier:
    """One input's sparsification state across passes (TaskVectorFold)."""

    index: int                      # in tensor.inputs
    density: float
    gamma: float = 0.0
    epsilon: float = 0.0
    searches: list[RankSearch] = field(default_factory=list)
    bounds: list[Bound] = field(default_factory=list)
    cuts: tuple[int, int] = (0, 0)  # breadcrumbs: the ascending ranks [n_bot, n_bot + target_n) kept
    keep_none: bool = False         # breadcrumbs with target_n == 0
    tie_starts: dict[int, Tensor] = field(default_factory=dict)   # bound -> first tie position of each row
    ranks: Tensor | None = None     # DELLA on a 1-D tensor: each element's ascending rank over the tensor
    scale: Tensor | None = None     # the L1 rescale factor, once summed
    bits: Tensor | None = None      # DARE: the mask drawn in the sums pass, packed (sparsify.pack_bits)
    packed: int = 0                 # elements of it packed so far; all of them, or the fold draws again

    @property
    def positioned(self) -> list[int]:
        """The bounds whose ties are kept by position."""
        return [j for j, b in enumerate(self.bounds) if b.needs_positions]


class TaskVectorFold(TensorFold):
    """mergekit's generalized task arithmetic on blocks of rows: task vectors, sparsified, weighted, sign-elected
    (consensus), summed, normalized, scaled by lambda, added to the base (methods.py).

    First passes: for the top-k magnitudes, one pass per input gathering its magnitude keys over the tensor
    (sparsify.py: ties as mergekit's sort leaves them); for breadcrumbs' cuts, ``key_passes`` histogram passes then one pass
    counting each row's ties; for DELLA on a 1-D tensor, one pass collecting its magnitudes; with ``rescale``,
    one pass summing ``|d_i|`` and ``|masked d_i|`` per row."""

    transposed = False

    def __init__(self, method: ModelMergeMethod, tensor: TensorInputs) -> None:
        self.method, self.tensor = method, tensor
        md, value = tensor.math_dtype, method.param_value
        self.non_base = [i for i in range(len(tensor.inputs)) if i != tensor.base_index]
        self.weights = [value(tensor.params[i], "weight") for i in self.non_base]
        self.rescale = bool(value(tensor.shared, "rescale"))
        self.normalize = bool(value(tensor.shared, "normalize"))
        self.lam = value(tensor.shared, "lambda")
        self.work_dtype = work_dtype(method, md)
        self.sparse = {i: self._sparsifier(i) for i in self.non_base
                       if method.sparsification and tensor.numel and value(tensor.params[i], "density") < 1}
        ranked = tensor.shape[1] if len(tensor.shape) > 1 else tensor.numel
        if method.sparsification == "della_magprune" and self.sparse and ranked == 1:
            raise ConfigError(f"{method.name}: {tensor.name} has shape {list(tensor.shape)}, and DELLA ranks "
                              f"magnitudes along its second dimension, where one element has no rank (mergekit "
                              f"fails on it); give it density 1 or merge it with another method")
        stages = []
        if method.sparsification == "magnitude" and self.sparse:  # first, one pass per input: its keys alone
            self.ordered, self.order_keys, self.order_lock = list(self.sparse), None, threading.Lock()
            stages += ["order"] * len(self.ordered)
        if method.sparsification == "magnitude_outliers" and self.sparse:
            stages += ["keys"] * key_passes(md) + ["ties"]
        if method.sparsification == "della_magprune" and self.sparse and len(tensor.shape) <= 1:
            stages.append("magnitudes")
        if self.rescale and self.sparse:
            stages.append("sums")
        self.lock, self.folded = threading.Lock(), 0  # rows folded, after which kept state is let go
        self.stages, self.stage = stages, 0
        self.passes = len(stages)

    def _sparsifier(self, i: int) -> _Sparsifier:
        t, value = self.tensor, self.method.param_value
        s = _Sparsifier(i, value(t.params[i], "density"), value(t.params[i], "gamma") or 0.0,
                        value(t.params[i], "epsilon") or 0.0)
        numel, bits = t.numel, key_bits(t.math_dtype)
        if self.method.sparsification == "magnitude_outliers":
            target = int(s.density * numel)
            n_bot = max(0, numel - target - int(s.gamma * numel))
            s.cuts, s.keep_none = (n_bot, n_bot + target), target == 0
            if not s.keep_none:
                s.searches = [RankSearch(p, bits) for p in s.cuts if 0 < p < numel]
        return s

    # -- first passes ------------------------------------------------------------------------------------------

    def scan(self, rows: Tensor, scratch: Scratch, start: int, stop: int) -> Any:
        """Per sparsified input, a list of tensors: the histograms of its searches (keys), or per-row values in
        row order (ties: counts at each bound that needs positions; magnitudes; sums: |d_i| and |masked d_i|)."""
        stage, md, rows = self.stages[self.stage], self.tensor.math_dtype, rows.reshape(stop - start, -1)
        base = _md(rows, md) if md == rows.dtype else scratch("tv_base", tuple(rows.shape), md).copy_(rows)
        out = {}
        for i, s in self.sparse.items():
            if (stage == "ties" and not s.positioned) or (stage == "order" and i != self.ordered[self.stage]):
                continue
            delta = self._delta(i, rows, base, start, stop, scratch("tv_delta", tuple(base.shape), md))
            if stage == "order":
                cols = self.tensor.cols
                self._order_keys()[start * cols:stop * cols].copy_(magnitude_keys(delta).flatten())
            elif stage == "keys":
                keys = magnitude_keys(delta)
                out[i] = [search.histogram(keys) for search in s.searches]
            elif stage == "ties":
                keys = magnitude_keys(delta)
                out[i] = [(keys == s.bounds[j].value).sum(dim=1) for j in s.positioned]
            elif stage == "magnitudes":
                out[i] = [delta.flatten().clone()]  # delta is scratch, and partials outlive the block
            else:
                unmasked = _md(delta, self.work_dtype)
                magnitudes = scratch("tv_abs", tuple(base.shape), torch.float64)
                before = row_l1(unmasked, magnitudes)  # before _masked, which may mask delta in place
                out[i] = [before, row_l1(self._masked(s, delta, scratch, start, stop, first_pass=True), magnitudes)]
        return out

    def gather(self, partials: Iterable[Any]) -> None:
        """Histograms are summed as they come (O(bins)); per-row values are kept in row order (O(rows))."""
        stage = self.stages[self.stage]
        totals: dict[int, list] = {}
        if stage == "order":
            for _ in partials:  # every block's keys written
                pass
            s, keys, self.order_keys = self.sparse[self.ordered[self.stage]], self.order_keys, None
            k = max(1, int(s.density * self.tensor.numel))
            s.bounds = [top_k_as_sorted(keys, k)] if k < len(keys) else []
            del keys
            release_freed_memory()
            self.stage += 1
            return
        for partial in partials:
            for i, values in partial.items():
                if stage == "keys":
                    totals[i] = [a + b for a, b in zip(totals[i], values)] if i in totals else values
                else:
                    totals.setdefault(i, [[] for _ in values])
                    for kept, value in zip(totals[i], values):
                        kept.append(value)
        for i, s in self.sparse.items():
            if stage == "keys":
                for search, counts in zip(s.searches, totals.get(i, [])):
                    search.narrow(counts)
                if self.stages[self.stage + 1] != "keys":
                    self._bounds(s)
                continue
            rows = [torch.cat(parts) for parts in totals.get(i, [])]
            if stage == "ties":
                s.tie_starts = {j: torch.cumsum(counts, 0) - counts for j, counts in zip(s.positioned, rows)}
            elif stage == "magnitudes":
                s.ranks = row_ranks(rows[0][None, :])[0]
            else:
                before, after = (float(r.sum()) for r in rows)
                s.scale = l1_scale(before, after, self.work_dtype)
                s.bits = s.bits if s.packed == self.tensor.numel else None
        self.stage += 1

    def _order_keys(self) -> Tensor:
        """An input's keys over the whole tensor (16-bit for a 16-bit math dtype), made by the first block."""
        with self.order_lock:
            if self.order_keys is None:
                dtype = torch.int16 if self.tensor.math_dtype.itemsize == 2 else torch.int32
                self.order_keys = torch.empty(self.tensor.numel, dtype=dtype)
            return self.order_keys

    def _bounds(self, s: _Sparsifier) -> None:
        numel = self.tensor.numel
        if s.keep_none:
            return
        n_bot, hi = s.cuts
        searches = iter(s.searches)
        if 0 < n_bot < numel:
            low = next(searches)
            s.bounds.append(Bound(low.prefix, True, n_bot - low.below, low.equal, low.equal))
        if 0 < hi < numel:
            high = next(searches)
            s.bounds.append(Bound(high.prefix, False, 0, hi - high.below, high.equal))

    # -- the fold ----------------------------------------------------------------------------------------------

    def _delta(self, i: int, weight: Tensor, base: Tensor, start: int, stop: int, out: Tensor) -> Tensor:
        """``d_i = theta_i - base`` in the math dtype, in ``out``."""
        return torch.sub(_md(self.tensor.inputs[i].rows(weight, start, stop), self.tensor.math_dtype), base, out=out)

    def _masked(self, s: _Sparsifier, delta: Tensor, scratch: Scratch, start: int, stop: int,
                first_pass: bool = False) -> Tensor:
        """``d_i`` masked as mergekit's sparsification masks it (a product with the mask's 0/1), before any
        rescale: ``delta`` itself, masked in place, where the work dtype is the math dtype. The mask is compared
        into bool (into a float tensor torch allocates) and copied to 0/1 (a product with a bool tensor takes
        twice the time); the density is the work dtype's, as comparing with its tensor promotes it. A DARE mask
        is kept as bits (in the ``first_pass``) where the block starts on a byte, and read back by the fold
        instead of drawn again."""
        kind = self.method.sparsification
        t = self.tensor
        lo, hi = start * t.cols, stop * t.cols
        if kind in ("magnitude", "magnitude_outliers"):
            keep = self._magnitude_mask(s, delta, start)
        elif kind == "random" and s.bits is not None and not first_pass:
            flags = scratch("tv_flags", tuple(delta.shape), torch.bool)
            keep = flags.view(-1).copy_(unpack_bits(s.bits[lo // 8:-(-hi // 8)], hi - lo)).view(delta.shape)
            delta = _md(delta, self.work_dtype)
        else:
            u = uniforms(t.seed, t.name, s.index, t.numel, lo, hi, scratch("tv_uniforms", (hi - lo,)))
            u, flags = u.view(delta.shape), scratch("tv_flags", tuple(delta.shape), torch.bool)
            if kind == "random":
                drawn = torch.lt(u, float(torch.tensor(s.density, dtype=self.work_dtype)), out=flags)
                if first_pass and lo % 8 == 0 and (hi % 8 == 0 or hi == t.numel):
                    self._pack(s, drawn, lo, hi)
                keep = drawn
            else:
                keep = torch.lt(u, self._della_probabilities(s, delta, start, stop).reshape(delta.shape), out=flags)
            delta = _md(delta, self.work_dtype)
        return delta.mul_(scratch("tv_keep", tuple(delta.shape), delta.dtype).copy_(keep))

    def _pack(self, s: _Sparsifier, flags: Tensor, lo: int, hi: int) -> None:
        with self.lock:
            if s.bits is None:
                s.bits = torch.empty(-(-self.tensor.numel // 8), dtype=torch.uint8)
            s.packed += hi - lo
        s.bits[lo // 8:-(-hi // 8)] = pack_bits(flags)

    def _magnitude_mask(self, s: _Sparsifier, delta: Tensor, start: int) -> Tensor:
        if s.keep_none:
            return torch.zeros_like(delta, dtype=torch.bool)
        keys = magnitude_keys(delta)
        keep = torch.ones_like(keys, dtype=torch.bool)
        for j, bound in enumerate(s.bounds):
            if bound.kept is not None:
                keep &= bound.keeps_listed(keys, start * self.tensor.cols)
                continue
            starts = s.tie_starts.get(j)
            keep &= bound.keeps(keys, None if starts is None else int(starts[start]))
        return keep

    def _della_probabilities(self, s: _Sparsifier, delta: Tensor, start: int, stop: int) -> Tensor:
        shape = self.tensor.shape
        if len(shape) <= 1:
            return della_probabilities(s.ranks[start:stop].reshape(1, -1), self.tensor.numel, s.density,
                                       s.epsilon, self.work_dtype)
        return della_probabilities(row_ranks(delta.reshape(stop - start, *shape[1:])), shape[1], s.density,
                                   s.epsilon, self.work_dtype)

    def block(self, weight: Tensor, scratch: Scratch, start: int, stop: int) -> Tensor:
        """A fold folds each row once: after the last, its state is gone and another call is refused."""
        md, weight = self.tensor.math_dtype, weight.reshape(stop - start, -1)
        if self.folded >= self.tensor.rows and self.stages:
            raise RuntimeError(f"{self.tensor.name}: this fold has folded every row already; make another")
        if not self.non_base:
            return _md(weight, md)
        base = _md(weight, md) if md == weight.dtype else scratch("tv_base", tuple(weight.shape), md).copy_(weight)
        deltas = scratch("tv_deltas", (len(self.non_base), *base.shape), md)
        for j, i in enumerate(self.non_base):
            delta = self._delta(i, weight, base, start, stop, deltas[j])
            s = self.sparse.get(i)
            if s is not None:
                masked = self._masked(s, delta, scratch, start, stop)
                if s.scale is not None:
                    masked.mul_(s.scale)
                if masked is not delta:  # masked in another work dtype: rounded to the math dtype
                    delta.copy_(masked)
        merged = combine_deltas(base, deltas, self.weights, self.method.consensus, self.normalize, self.lam, scratch)
        with self.lock:
            self.folded += stop - start
            if self.folded == self.tensor.rows:  # the last block: what the passes kept goes
                self.sparse.clear()
        return merged


def row_ranks(x: Tensor) -> Tensor:
    """Each element's ascending rank by magnitude along dim 1, ties in index order (a stable sort)."""
    return torch.argsort(torch.argsort(x.abs(), dim=1, stable=True), dim=1, stable=True)


def della_probabilities(ranks: Tensor, n: int, density: float, epsilon: float, dtype: torch.dtype) -> Tensor:
    """mergekit's ``della_magprune`` keep probabilities from 0-based ranks along dim 1 (of ``n``), in its work
    ``dtype``: ``density - epsilon`` for the smallest magnitude rising to ``density + epsilon`` for the largest."""
    ranks = ranks.to(dtype) + 1
    lowest = torch.zeros((), dtype=torch.int64).to(dtype) + 1
    top = torch.tensor(n - 1, dtype=torch.int64).to(dtype) + 1
    rank_norm = ((ranks - lowest) / (top - lowest)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def combine_deltas(base: Tensor, deltas: Tensor, weights: list[float], consensus: bool, normalize: bool,
                   lam: float, scratch: Scratch | None = None) -> Tensor:
    """mergekit's generalized task arithmetic once the task vectors are sparsified: weighted, sign-elected
    (``consensus``: TIES's sum rule), summed, normalized, scaled by ``lam`` and added to ``base``, in base's
    dtype. ``deltas``: (inputs, *base.shape) in base's dtype, updated in place; the temporaries and the result
    are in ``scratch`` where given."""
    scratch = scratch or _fresh
    w, dtype, shape = torch.tensor(weights, dtype=deltas.dtype), deltas.dtype, tuple(base.shape)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    mixed = torch.sum(deltas, dim=0, out=scratch("tv_mixed", shape, dtype))
    if consensus:
        majority = torch.ge(mixed, 0, out=scratch("tv_majority", shape, dtype)).mul_(2).sub_(1)  # exactly -1 or 1
        sign = torch.sign(deltas, out=scratch("tv_sign", tuple(deltas.shape), dtype))
        mask = torch.eq(sign, majority, out=scratch("tv_mask", tuple(deltas.shape), dtype))  # 0/1: as fast as bool
        torch.sum(deltas.mul_(mask), dim=0, out=mixed)
        divisor = torch.sum(torch.mul(w, mask, out=sign), dim=0, out=majority)
        divisor.masked_fill_(torch.eq(divisor, 0, out=scratch("tv_zero", shape, torch.bool)), 1)
    else:
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return torch.add(base, mixed, out=mixed)


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(shape, dtype=dtype)
