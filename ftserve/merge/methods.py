"""Merge methods for full models, as mergekit 0.1.5 defines them, folded block by block in bounded memory.

Each method is mergekit's method of the same name: its parameters, defaults and arithmetic (same operations in
the same dtypes, so that the deterministic methods give mergekit's tensors bit for bit). With ``base`` the base
tensor and ``theta_i`` each input's, in the math dtype (the recipe's ``dtype``, else the stored one)::

    linear            sum_i w_i theta_i (/ sum_i w_i when normalize), in fp32       arXiv:2203.05482
    task arithmetic   base + lambda sum_i w_i d_i (/ sum_i w_i when normalize),     arXiv:2212.04089
                      d_i = theta_i - base
    ties              d_i pruned to its top-k magnitudes (k = max(1, int(density numel))), weighted, and
                      only the entries agreeing with the sign of sum_i w_i d_i kept; normalize divides by
                      the sum of the weights of the agreeing entries                arXiv:2306.01708
    dare_linear/ties  d_i masked at random (keep with probability density), its L1 norm rescaled to the
                      unmasked one (rescale), then as task arithmetic / ties        arXiv:2311.03099
    magnitude_prune   ties without the sign election (PEFT's ``magnitude_prune``, see below)
    breadcrumbs(_ties) d_i keeps the magnitudes ranked [n_bot, n_bot + target_n) in ascending order:
                      the gamma largest and the smallest dropped                   arXiv:2312.06795
    della(_linear)    d_i masked at random, keep probability rising with the magnitude rank in each row
                      from density - epsilon to density + epsilon                  arXiv:2406.11617
    slerp             spherical interpolation from base to the other input by t, norms and angle over
                      the whole tensor, in fp32 (linear where the two are nearly parallel)

The task-vector methods are one fold (``TaskVectorFold``, mergekit's generalized task arithmetic): each a choice
of sparsification and of the sign election. Where the whole tensor matters (a magnitude threshold, a rescale
sum, slerp's norms and angle) a fold asks write.py for first passes (combine.TensorFold), keeping O(rows) or
O(histogram bins) between passes; sparsify.py says how thresholds stay exact and masks reproducible. A fold
holds a few blocks of each input at a time, never a whole tensor (``reference_merge`` does, for verify).

Where the result is not mergekit's bit for bit:
- elements tied at a magnitude cut are taken in index order (mergekit: its unstable sort's order);
- a random mask is ours, seeded per chunk of each tensor (mergekit: its global RNG);
- whole-tensor sums (the L1 rescale, slerp's norms and dot product) are float64 sums of per-row float64 sums,
  rounded once (mergekit: torch's fp32 reduction, whose order depends on the thread count), so a rescale factor
  or a slerp coefficient can differ in its last bit.

``magnitude_prune`` is PEFT's name (``add_weighted_adapter(combination_type="magnitude_prune")``, merge_utils'
``magnitude_prune``: prune each task vector by magnitude, then a plain weighted sum). mergekit has no method of
that name; ours is its generalized task arithmetic with magnitude sparsification and no sign election, which is
PEFT's arithmetic except that k is ``max(1, int(density numel))`` (PEFT: ``int(density numel)``, possibly 0)
and that ``normalize``, ``lambda`` and ``rescale`` are there, off by default as PEFT has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace as dataclass_replace
from typing import Any, Iterable, Protocol

import torch
from torch import Tensor

from ..errors import ConfigError
from .combine import Scratch, TensorFold
from .sparsify import Bound, RankSearch, key_bits, key_passes, l1_scale, magnitude_keys, row_l1, top_k, uniforms


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# mergekit's methods that we do not have, refused by name.
NOT_SUPPORTED = ("model_stock", "karcher", "nuslerp", "multislerp", "sce", "ram", "ramplus_tl", "nearswap",
                 "arcee_fusion", "passthrough")
SLERP_DOT_THRESHOLD, SLERP_EPS = 0.9995, 1e-8  # mergekit's: nearly parallel inputs interpolate linearly


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    per_input: bool
    default: object = REQUIRED


@dataclass(frozen=True)
class ModelMergeMethod:
    """One of mergekit's methods: its parameters and input contract, and its fold (module docstring).

    ``sparsification`` (mergekit's name: magnitude, random, magnitude_outliers, della_magprune) and ``consensus``
    (the TIES sign election) say which task-vector method it is."""

    name: str
    title: str
    reference: str
    params: tuple[Param, ...]
    needs_base: bool
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    sparsification: str | None = None
    consensus: bool = False

    def check(self, per_input: list[dict[str, object]], shared: dict[str, object],
              base_index: int | None = None) -> None:
        """ConfigError, one line naming the method and the parameter, for an unknown parameter, a missing
        required one, a wrong type or an out-of-range value; values are scalars. ``per_input``: one dict per
        listed input; ``base_index``: which of them is the base, whose per-model values a method that needs a
        base ignores (as mergekit does; ``linear`` has no base and weighs every input)."""
        count = len(per_input) + int(self.needs_base and base_index is None)
        if count < self.min_inputs or (self.max_inputs is not None and count > self.max_inputs):
            wanted = (f"exactly {self.min_inputs}" if self.min_inputs == self.max_inputs
                      else f"at least {self.min_inputs}")
            raise ConfigError(f"{self.name} merges {wanted} models counting the base, got {count}")
        self._check_values("parameters", shared, per_input=False)
        for i, values in enumerate(per_input):
            self._check_values(f"input {i}", values, per_input=True)
        weighed = [i for i in range(len(per_input)) if not (self.needs_base and i == base_index)]
        for p in self.params:
            if p.default is REQUIRED and not p.per_input and p.name not in shared:
                raise ConfigError(f"{self.name} needs {p.name!r} in parameters")
            missing = [i for i in weighed if p.default is REQUIRED and p.per_input and p.name not in per_input[i]]
            if missing:
                raise ConfigError(f"{self.name} needs {p.name!r} for input {missing[0]}")
        if self.name == "linear" and self.param_value(shared, "normalize") and \
                sum(per_input[i]["weight"] for i in weighed) == 0:
            # mergekit's task arithmetic guards its divisor, its linear merge does not
            raise ConfigError(f"{self.name}: the weights sum to 0, so normalize divides by zero; set normalize: "
                              f"false or change the weights")
        if self.sparsification == "della_magprune":
            for i in weighed:
                d, e = self.param_value(per_input[i], "density"), self.param_value(per_input[i], "epsilon")
                if d < 1 and not (0 < d - e and d + e < 1):  # mergekit raises this while merging
                    raise ConfigError(f"{self.name}: input {i} has density {d:g} and epsilon "
                                      f"{e:g}; density - epsilon and density + epsilon must both lie in (0, 1)")

    def _check_values(self, scope: str, values: dict[str, object], per_input: bool) -> None:
        kind = "per-model" if per_input else "shared"
        for key, value in values.items():
            p = next((p for p in self.params if p.name == key and p.per_input == per_input), None)
            if p is None:
                known = ", ".join(q.name for q in self.params if q.per_input == per_input)
                raise ConfigError(f"{self.name} has no {kind} parameter {key!r} ({scope}); its {kind} parameters: "
                                  f"{known or 'none'}")
            self._check_value(p, value, scope)

    def param_value(self, values: dict[str, object], name: str) -> Any:
        """``values[name]``, else the parameter's default (None for a parameter this method does not have)."""
        if name in values:
            return values[name]
        return next((p.default for p in self.params if p.name == name), None)

    def _check_value(self, p: Param, value: object, scope: str) -> None:
        where = f"{self.name}: {p.name} ({scope})"
        if p.kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        if p.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if p.kind is float and not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        if p.name == "density" and not 0 < value <= 1:
            treated = "no pruning" if value > 1 else "dropping the whole task vector"
            raise ConfigError(f"{where} must lie in (0, 1], got {value!r} (mergekit would silently treat it as "
                              f"{treated})")
        if p.name in ("t", "gamma", "epsilon") and not 0 <= value <= 1:
            raise ConfigError(f"{where} must lie in [0, 1], got {value!r}")

    def fold(self, tensor: "TensorInputs") -> TensorFold:
        if self.name == "linear":
            return LinearFold(self, tensor)
        if self.name == "slerp":
            return SlerpFold(self, tensor)
        return TaskVectorFold(self, tensor)


class InputRows(Protocol):
    """One input model's version of one output tensor, read block by block (from worker threads)."""

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of theta_i as stored (any float dtype; the method casts to math dtype).
        ``base``: the same rows of the base tensor in fp32 (exact copy of the stored values)."""


@dataclass
class TensorRows:
    """An input held whole in memory (tests, verify, small tensors)."""

    tensor: Tensor

    def rows(self, base: Tensor, start: int, stop: int) -> Tensor:
        rows = self.tensor.shape[0] if self.tensor.dim() else 1
        return self.tensor.reshape(rows, -1)[start:stop]


@dataclass
class TensorInputs:
    name: str
    shape: tuple[int, ...]
    stored_dtype: torch.dtype
    math_dtype: torch.dtype
    inputs: list[InputRows]
    base_index: int | None
    params: list[dict[str, object]]
    shared: dict[str, object]
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def cols(self) -> int:
        return self.numel // self.rows if self.rows else 0


def _gta(name: str, title: str, reference: str, sparsification: str | None, consensus: bool, normalize: bool,
         rescale: bool, random: bool = False) -> ModelMergeMethod:
    params = [Param("int8_mask", bool, False, False), Param("normalize", bool, False, normalize),
              Param("rescale", bool, False, rescale), Param("lambda", float, False, 1.0),
              Param("weight", float, True), Param("density", float, True, 1.0)]
    if sparsification == "magnitude_outliers":
        params.append(Param("gamma", float, True, 0.01))
    if sparsification == "della_magprune":
        params.append(Param("epsilon", float, True, 0.15))
    return ModelMergeMethod(name, title, reference, tuple(params), needs_base=True, random=random,
                            sparsification=sparsification, consensus=consensus)


METHODS: dict[str, ModelMergeMethod] = {m.name: m for m in (
    ModelMergeMethod("linear", "Linear", "https://arxiv.org/abs/2203.05482",
                     (Param("weight", float, True), Param("normalize", bool, False, True)), needs_base=False),
    _gta("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", None, False, False, False),
    _gta("ties", "TIES", "https://arxiv.org/abs/2306.01708", "magnitude", True, True, False),
    _gta("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099", "random", True, False, True, True),
    _gta("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099", "random", False, False, True, True),
    _gta("magnitude_prune", "Magnitude Prune (PEFT)", "https://huggingface.co/docs/peft/developer_guides/model_merging",
         "magnitude", False, False, False),
    _gta("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795", "magnitude_outliers", False,
         False, False),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
         "magnitude_outliers", True, False, False),
    _gta("della", "DELLA", "https://arxiv.org/abs/2406.11617", "della_magprune", True, True, True, True),
    _gta("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617", "della_magprune", False, False,
         True, True),
    ModelMergeMethod("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", (Param("t", float, False),),
                     needs_base=True, min_inputs=2, max_inputs=2),
)}


def get_merge_method(name: str) -> ModelMergeMethod:
    """The method called ``name``, else a ConfigError naming it and the methods there are."""
    if name in METHODS:
        return METHODS[name]
    known = ", ".join(METHODS)
    if name in NOT_SUPPORTED:
        raise ConfigError(f"merge method {name!r} is mergekit's, but ftserve does not support it; use one of: {known}")
    raise ConfigError(f"unknown merge method {name!r}; use one of: {known}")


def work_dtype(method: ModelMergeMethod, math_dtype: torch.dtype) -> torch.dtype:
    """The dtype a task vector is masked and rescaled in: mergekit's random masks (bernoulli, DELLA) work in
    bf16 for bf16 and in fp32 otherwise (on CPU, where torch has no fp16 bernoulli); magnitude cuts in the math
    dtype."""
    if method.random:
        return math_dtype if math_dtype == torch.bfloat16 else torch.float32
    return math_dtype


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

    @property
    def positioned(self) -> list[int]:
        """The bounds whose ties are kept by position."""
        return [j for j, b in enumerate(self.bounds) if b.needs_positions]


class TaskVectorFold(TensorFold):
    """mergekit's generalized task arithmetic on blocks of rows: task vectors, sparsified, weighted, sign-elected
    (consensus), summed, normalized, scaled by lambda, added to the base (module docstring).

    First passes: for magnitude cuts, ``key_passes`` histogram passes then one pass counting each row's ties;
    for DELLA on a 1-D tensor, one pass collecting its magnitudes; with ``rescale``, one pass summing ``|d_i|``
    and ``|masked d_i|`` per row."""

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
        if method.sparsification in ("magnitude", "magnitude_outliers") and self.sparse:
            stages += ["keys"] * key_passes(md) + ["ties"]
        if method.sparsification == "della_magprune" and self.sparse and len(tensor.shape) <= 1:
            stages.append("magnitudes")
        if self.rescale and self.sparse:
            stages.append("sums")
        self.stages, self.stage = stages, 0
        self.passes = len(stages)

    def _sparsifier(self, i: int) -> _Sparsifier:
        t, value = self.tensor, self.method.param_value
        s = _Sparsifier(i, value(t.params[i], "density"), value(t.params[i], "gamma") or 0.0,
                        value(t.params[i], "epsilon") or 0.0)
        numel, bits = t.numel, key_bits(t.math_dtype)
        if self.method.sparsification == "magnitude":
            s.searches = [RankSearch(numel - max(1, int(s.density * numel)), bits)]
        elif self.method.sparsification == "magnitude_outliers":
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
        base = _md(rows, md)
        out = {}
        for i, s in self.sparse.items():
            if stage == "ties" and not s.positioned:
                continue
            delta = self._delta(i, rows, base, start, stop)
            if stage == "keys":
                keys = magnitude_keys(delta)
                out[i] = [search.histogram(keys) for search in s.searches]
            elif stage == "ties":
                keys = magnitude_keys(delta)
                out[i] = [(keys == s.bounds[j].value).sum(dim=1) for j in s.positioned]
            elif stage == "magnitudes":
                out[i] = [delta.flatten()]
            else:
                unmasked = _md(delta, self.work_dtype)
                out[i] = [row_l1(unmasked), row_l1(self._masked(s, delta, start, stop))]
        return out

    def gather(self, partials: Iterable[Any]) -> None:
        """Histograms are summed as they come (O(bins)); per-row values are kept in row order (O(rows))."""
        stage = self.stages[self.stage]
        totals: dict[int, list] = {}
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
        self.stage += 1

    def _bounds(self, s: _Sparsifier) -> None:
        numel = self.tensor.numel
        if self.method.sparsification == "magnitude":
            s.bounds = [top_k(s.searches[0], numel, max(1, int(s.density * numel)))]
            return
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

    def _delta(self, i: int, weight: Tensor, base: Tensor, start: int, stop: int) -> Tensor:
        return _md(self.tensor.inputs[i].rows(weight, start, stop), self.tensor.math_dtype) - base

    def _masked(self, s: _Sparsifier, delta: Tensor, start: int, stop: int) -> Tensor:
        """``d_i`` masked as mergekit's sparsification masks it, before any rescale."""
        kind = self.method.sparsification
        if kind in ("magnitude", "magnitude_outliers"):
            return delta * self._magnitude_mask(s, delta, start).to(delta.dtype)
        t = self.tensor
        lo, hi = start * t.cols, stop * t.cols
        u = uniforms(t.seed, t.name, s.index, t.numel, lo, hi).view(delta.shape)
        work = _md(delta, self.work_dtype)
        if kind == "random":
            p = torch.tensor(s.density, dtype=self.work_dtype)
            return work * (u < p).to(self.work_dtype)
        probs = self._della_probabilities(s, delta, start, stop)
        return work * (u < probs.reshape(delta.shape)).to(self.work_dtype)

    def _magnitude_mask(self, s: _Sparsifier, delta: Tensor, start: int) -> Tensor:
        if s.keep_none:
            return torch.zeros_like(delta, dtype=torch.bool)
        keys = magnitude_keys(delta)
        keep = torch.ones_like(keys, dtype=torch.bool)
        for j, bound in enumerate(s.bounds):
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
        md, weight = self.tensor.math_dtype, weight.reshape(stop - start, -1)
        base = _md(weight, md)
        if not self.non_base:
            return base
        deltas = base.new_empty((len(self.non_base), *base.shape))
        for j, i in enumerate(self.non_base):
            delta = self._delta(i, weight, base, start, stop)
            s = self.sparse.get(i)
            if s is not None:
                masked = self._masked(s, delta, start, stop)
                if s.scale is not None:
                    masked = masked * s.scale
                delta = _md(masked, md)
            deltas[j] = delta
        return combine_deltas(base, deltas, self.weights, self.method.consensus, self.normalize, self.lam)


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
                   lam: float) -> Tensor:
    """mergekit's generalized task arithmetic once the task vectors are sparsified: weighted, sign-elected
    (``consensus``: TIES's sum rule), summed, normalized, scaled by ``lam`` and added to ``base``, in base's
    dtype. ``deltas``: (inputs, *base.shape), updated in place."""
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        sign = deltas.sign()
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


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
        a = _md(weight, md).to(self.dtype)
        b = _md(self.tensor.inputs[self.other].rows(weight, start, stop), md).to(self.dtype)
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


def reference_merge(method: ModelMergeMethod, base: Tensor, thetas: list[Tensor], tensor: TensorInputs) -> Tensor:
    """The whole merged tensor computed directly on whole tensors (for verify and tests): cut points by a stable
    sort instead of histograms, masks drawn for the whole tensor at once, sums over the whole tensor. It equals
    the streamed fold, which holds a block at a time (linear and slerp, with no cut or mask, run their fold on
    the whole tensor as one block); ``thetas``: each input's whole tensor as stored, in ``tensor.inputs``'
    order."""
    md, rows = tensor.math_dtype, tensor.rows
    weight = base.reshape(rows, -1).float()
    inputs = [t.reshape(rows, -1) for t in thetas]
    if method.name in ("linear", "slerp"):
        whole = dataclass_replace(tensor, inputs=[TensorRows(t) for t in inputs])
        fold = method.fold(whole)
        for _ in range(fold.passes):  # slerp's sums, over the whole tensor as one block
            fold.gather([fold.scan(weight, _no_scratch, 0, rows)])
        return fold.block(weight, _no_scratch, 0, rows).reshape(tensor.shape)
    value = method.param_value
    base_md = weight.to(md)
    non_base = [i for i in range(len(inputs)) if i != tensor.base_index]
    if not non_base:
        return base_md.reshape(tensor.shape)
    deltas = base_md.new_empty((len(non_base), *base_md.shape))
    for j, i in enumerate(non_base):
        delta = inputs[i].to(md) - base_md
        density = value(tensor.params[i], "density")
        if method.sparsification and density < 1:
            delta = _sparsified_whole(method, tensor, i, delta, density)
        deltas[j] = delta
    weights = [value(tensor.params[i], "weight") for i in non_base]
    merged = combine_deltas(base_md, deltas, weights, method.consensus, value(tensor.shared, "normalize"),
                            value(tensor.shared, "lambda"))
    return merged.reshape(tensor.shape)


def _sparsified_whole(method: ModelMergeMethod, tensor: TensorInputs, i: int, delta: Tensor,
                      density: float) -> Tensor:
    """One task vector sparsified as mergekit does, over the whole (rows, cols) tensor (reference_merge)."""
    kind, numel, md = method.sparsification, tensor.numel, tensor.math_dtype
    work = work_dtype(method, md)
    keys = magnitude_keys(delta).flatten()
    mask = torch.zeros(numel, dtype=work)
    if kind == "magnitude":
        mask[torch.argsort(keys, descending=True, stable=True)[:max(1, int(density * numel))]] = 1
    elif kind == "magnitude_outliers":
        target = int(density * numel)
        n_bot = max(0, numel - target - int(method.param_value(tensor.params[i], "gamma") * numel))
        mask[torch.argsort(keys, stable=True)[n_bot:n_bot + target]] = 1
    else:
        u = uniforms(tensor.seed, tensor.name, i, numel, 0, numel)
        if kind == "random":
            mask = (u < torch.tensor(density, dtype=work)).to(work)
        else:
            shaped = delta.reshape(tensor.shape) if len(tensor.shape) > 1 else delta.reshape(1, -1)
            n = tensor.shape[1] if len(tensor.shape) > 1 else numel
            probs = della_probabilities(row_ranks(shaped), n, density,
                                        method.param_value(tensor.params[i], "epsilon"), work)
            mask = (u < probs.flatten()).to(work)
    delta = delta.to(work)
    masked = delta * mask.view(delta.shape)
    if method.param_value(tensor.shared, "rescale"):
        scale = l1_scale(float(row_l1(delta).sum()), float(row_l1(masked).sum()), work)
        if scale is not None:
            masked = masked * scale
    return masked.to(md)


def _no_scratch(name: str, shape: tuple[int, int]) -> Tensor:
    return torch.empty(shape)
