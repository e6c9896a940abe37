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

This module is the registry, ``METHODS``; method_spec.py says what a method is (its parameters, their checks,
what its fold is given), folds.py how each method folds a tensor block by block, and ``reference_merge`` below
recomputes a merged tensor whole, for verify.

Where the result is not mergekit's bit for bit:
- elements tied at breadcrumbs' magnitude cuts are taken in index order (mergekit: its unstable sort's order;
  at the top-k cut of ties and magnitude_prune ours is its order, sparsify.py);
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

from dataclasses import replace as dataclass_replace

import torch
from torch import Tensor

from ..errors import ConfigError
from .folds import LinearFold, TaskVectorFold, combine_deltas, della_probabilities, row_ranks
from .method_spec import REQUIRED, InputRows, ModelMergeMethod, Param, TensorInputs, TensorRows, work_dtype
from .slerp import SLERP_DOT_THRESHOLD, SLERP_EPS, SlerpFold, slerp_coefficients, slerp_norm
from .sparsify import l1_scale, magnitude_keys, row_l1, uniforms

__all__ = ["METHODS", "NOT_SUPPORTED", "REQUIRED", "SLERP_DOT_THRESHOLD", "SLERP_EPS", "InputRows", "LinearFold",
           "ModelMergeMethod", "Param", "SlerpFold", "TaskVectorFold", "TensorInputs", "TensorRows",
           "combine_deltas", "della_probabilities", "get_merge_method", "reference_merge", "row_ranks",
           "slerp_coefficients", "slerp_norm", "work_dtype"]

# mergekit's methods that we do not have, refused by name.
NOT_SUPPORTED = ("model_stock", "karcher", "nuslerp", "multislerp", "sce", "ram", "ramplus_tl", "nearswap",
                 "arcee_fusion", "passthrough")


def _gta(name: str, title: str, reference: str, sparsification: str | None, consensus: bool, normalize: bool,
         rescale: bool, random: bool = False) -> ModelMergeMethod:
    params = [Param("int8_mask", bool, False, False), Param("normalize", bool, False, normalize),
              Param("rescale", bool, False, rescale), Param("lambda", float, False, 1.0),
              Param("weight", float, True), Param("density", float, True, 1.0)]
    if sparsification == "magnitude_outliers":
        params.append(Param("gamma", float, True, 0.01))
    if sparsification == "della_magprune":
        params.append(Param("epsilon", float, True, 0.15))
    return ModelMergeMethod(name, title, reference, tuple(params), needs_base=True, fold_class=TaskVectorFold,
                            random=random, sparsification=sparsification, consensus=consensus)


METHODS: dict[str, ModelMergeMethod] = {m.name: m for m in (
    ModelMergeMethod("linear", "Linear", "https://arxiv.org/abs/2203.05482",
                     (Param("weight", float, True), Param("normalize", bool, False, True)), needs_base=False,
                     fold_class=LinearFold),
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
                     needs_base=True, fold_class=SlerpFold, min_inputs=2, max_inputs=2),
)}


def get_merge_method(name: str) -> ModelMergeMethod:
    """The method called ``name``, else a ConfigError naming it and the methods there are."""
    if name in METHODS:
        return METHODS[name]
    known = ", ".join(METHODS)
    if name in NOT_SUPPORTED:
        raise ConfigError(f"merge method {name!r} is mergekit's, but ftserve does not support it; use one of: {known}")
    raise ConfigError(f"unknown merge method {name!r}; use one of: {known}")


def reference_merge(method: ModelMergeMethod, base: Tensor, thetas: list[Tensor], tensor: TensorInputs) -> Tensor:
    """The whole merged tensor computed directly on whole tensors (for verify and tests): the top-k by mergekit's
    own argsort, breadcrumbs' cut points by a stable sort instead of histograms, masks drawn for the whole tensor at once, sums over the whole tensor. It equals
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
        mask[torch.argsort(keys, descending=True)[:max(1, int(density * numel))]] = 1
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


def _no_scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(shape, dtype=dtype)
