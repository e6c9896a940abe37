"""Merge methods for full models (ftserve.merge.methods) against mergekit 0.1.5's own methods on the same tensors.

Each method's fold runs as write.py drives it: its first passes over every block of ``ROWS`` rows, then the
blocks; the result is compared with mergekit's method called on the whole tensors (its ``TensorGroup`` entry
point, the one its merge runs). Two things are ours by design, and the oracle is given them:

- random masks: mergekit's ``torch.bernoulli`` draws from our seeded chunks (``MergekitDraws``), so that DARE and
  DELLA are compared on the same mask;
- ties at breadcrumbs' magnitude cuts: mergekit's sorts are unstable, ours stable there; given stable sorts
  mergekit's result is ours bit for bit, and without them the two differ only at elements tied at a cut. At the
  top-k cut (ties, magnitude_prune) ours keeps the ties mergekit's own sort keeps: its argsort stays as it is.

Whole-tensor sums (an L1 rescale, slerp's norms and angle) are float64 sums of rows here and torch's fp32
reductions there: those results agree to an ulp of the output in bf16 (a few in fp32), not bit for bit.
"""

import math

import pytest
import torch
from mergekit import sparsify as mergekit_sparsify
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod
from peft.utils import merge_utils

from ftserve import ConfigError
from ftserve.merge.combine import fold_tensor
from ftserve.merge.methods import (METHODS, NOT_SUPPORTED, REQUIRED, TensorInputs, TensorRows, get_merge_method,
                                   reference_merge)
from ftserve.merge.sparsify import MASK_CHUNK, uniforms

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 8  # rows per block, as write.py's smallest block
SHAPES = [(37, 19), (50,), (6, 5, 4)]  # 37 and 50 rows: the last block is short
DTYPES = [torch.float32, torch.bfloat16]
WEIGHTS = [0.5, 0.3, -0.2]
DENSITIES = [0.5, 0.3, 0.7]
SEED, NAME = 7, "model.layers.0.mlp.up_proj.weight"
# parameters beyond weight/density that each method is run with (mergekit's defaults otherwise)
PER_INPUT = {"breadcrumbs": {"gamma": 0.1}, "breadcrumbs_ties": {"gamma": 0.05}, "della": {"epsilon": 0.1},
             "della_linear": {"epsilon": 0.2}}
SHARED = {"linear": {}, "task_arithmetic": {"lambda": 0.8}, "slerp": {"t": 0.3}}
RESCALED = [name for name, method in METHODS.items() if method.param_value({}, "rescale")]  # DARE, DELLA


def streamed(method, tensor, base, rows=ROWS):
    """The fold driven as write.py drives it: each first pass over every block, then the blocks."""
    fold = method.fold(tensor)
    weight = base.reshape(tensor.rows, -1).float()
    blocks = [(start, min(start + rows, tensor.rows)) for start in range(0, tensor.rows, rows)]
    for _ in range(fold.passes):
        fold.gather([fold.scan(weight[a:b].clone(), scratch, a, b) for a, b in blocks])
    return torch.cat([fold.block(weight[a:b].clone(), scratch, a, b).clone() for a, b in blocks]).reshape(tensor.shape)


_buffers = {}


def scratch(name, shape, dtype=torch.float32):
    """As write.py's: one buffer per name, reused (a partial kept from it would change under the next block),
    refilled with garbage on each call: a fold must not read what it did not write."""
    numel = math.prod(shape)
    buffer = _buffers.get(name)
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        buffer = _buffers[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].fill_(float("nan") if dtype.is_floating_point else 1).view(shape)


def inputs_for(name, dtype, shape, seed=0, count=3):
    """A base and ``count`` fine-tuned versions of it (small task vectors), stored in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    count = 1 if name == "slerp" else count
    return base, [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]


def params_for(name, count, **shared):
    method = METHODS[name]
    per = [{"weight": w} for w in WEIGHTS[:count]] if name != "slerp" else [{}]
    for p, d in zip(per, DENSITIES):
        if method.sparsification:
            p.update(density=d, **PER_INPUT.get(name, {}))
    return per, {**SHARED.get(name, {}), **shared}


def tensor_inputs(base, thetas, per, shared, seed=SEED, math_dtype=None):
    return TensorInputs(NAME, tuple(base.shape), base.dtype, math_dtype or base.dtype, [TensorRows(t) for t in thetas],
                        None, per, shared, seed)


class MergekitDraws:
    """``torch`` as mergekit's sparsify module sees it, with our random draws (input by input, in order) and,
    when ``stable``, stable sorts where ours are stable (breadcrumbs' sort, DELLA's ranks; the top-k's descending
    argsort stays mergekit's)."""

    def __init__(self, tensor, stable, first=0):
        self.tensor, self.stable, self.calls = tensor, stable, first

    def __getattr__(self, name):
        return getattr(torch, name)

    def bernoulli(self, p):
        u = uniforms(self.tensor.seed, self.tensor.name, self.calls, p.numel(), 0, p.numel()).view(p.shape)
        self.calls += 1
        return (u < p).to(p.dtype)

    def argsort(self, x, dim=-1, descending=False):
        return torch.argsort(x, dim=dim, descending=descending, stable=self.stable and not descending)

    def sort(self, x, descending=False):
        return torch.sort(x, descending=descending, stable=self.stable)


def mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch, stable=True, base_listed=False):
    """mergekit's method on the whole tensors in ``tensor.math_dtype``, with our masks (and stable sorts);
    ``base_listed``: ``thetas`` start with the base, as a recipe that lists it among its models."""
    if name == "magnitude_prune":  # PEFT's name; in mergekit's terms (the methods module docstring):
        method = GeneralizedTaskArithmeticMerge(None, SparsificationMethod.magnitude, False, False,
                                                "magnitude_prune", None, None)
    else:
        method = registry.get(name)
    parameters = dict(shared)
    for p in method.spec.input_parameters:
        entries = per[1:] if base_listed and p.scope == ParameterScope.NON_BASE else per
        if p.name in entries[0]:
            parameters[p.name] = [v[p.name] for v in entries]
    if name == "linear" or base_listed:
        group = TensorGroup.from_tensors(thetas, base_index=0 if base_listed else None)
    else:
        group = TensorGroup.from_tensors([base, *thetas], base_index=0)
    with monkeypatch.context() as patch:
        patch.setattr(mergekit_sparsify, "torch", MergekitDraws(tensor, stable, first=int(base_listed)))
        (merged,) = method([group], parameters=parameters, dtype=tensor.math_dtype)
    return merged


def assert_within_ulps(ours, theirs, base, ulps):
    """Each element within ``ulps`` units in the last place of the output dtype, at the larger of the output's and
    the base's magnitude (where the base and the task vectors cancel, an error of the latter stays absolute)."""
    scale = torch.maximum(theirs.abs(), base.abs())
    spacing = (torch.nextafter(scale, torch.tensor(float("inf"), dtype=scale.dtype)) - scale).float()
    far = (ours.float() - theirs.float()).abs() > ulps * spacing
    assert not far.any(), f"{int(far.sum())} elements differ by more than {ulps} ulp(s)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", [n for n in METHODS if n not in RESCALED and n != "slerp"])
def test_deterministic_method_is_mergekits_bit_for_bit(name, shape, dtype, monkeypatch):
    base, thetas = inputs_for(name, dtype, shape)
    per, shared = params_for(name, len(thetas))
    tensor = tensor_inputs(base, thetas, per, shared)
    ours = streamed(METHODS[name], tensor, base)
    assert ours.dtype == dtype
    assert torch.equal(ours, mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch))


@pytest.mark.parametrize("stored, math", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "breadcrumbs", "dare_linear", "della"])
def test_math_dtype_is_mergekits_dtype(name, stored, math, monkeypatch):
    """Inputs are cast to the recipe's dtype before the method computes, as mergekit's ``dtype:`` does."""
    base, thetas = inputs_for(name, stored, (37, 19))
    per, shared = params_for(name, len(thetas), **({"rescale": False} if METHODS[name].random else {}))
    tensor = tensor_inputs(base, thetas, per, shared, math_dtype=math)
    ours = streamed(METHODS[name], tensor, base)
    assert ours.dtype == math
    assert torch.equal(ours, mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch))


@pytest.mark.parametrize("name", ["linear", "ties", "dare_ties", "slerp"])
def test_base_listed_among_the_models(name, monkeypatch):
    """A recipe may list the base among its models: linear weighs it as any input; the others take it as the
    base, with no per-model values, and the other inputs keep their places (their masks' input index)."""
    base, thetas = inputs_for(name, torch.bfloat16, (37, 19))
    per, shared = params_for(name, len(thetas), **({"rescale": False} if METHODS[name].random else {}))
    listed, per = [base, *thetas], [{"weight": 0.25} if name == "linear" else {}, *per]
    tensor = TensorInputs(NAME, tuple(base.shape), base.dtype, base.dtype, [TensorRows(t) for t in listed], 0, per,
                          shared, SEED)
    METHODS[name].check(per, shared, base_index=0)
    ours = streamed(METHODS[name], tensor, base)
    theirs = mergekit_merge(name, base, listed, per, shared, tensor, monkeypatch, base_listed=True)
    if name == "slerp":
        assert_within_ulps(ours, theirs, base, 1)
    else:
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, values", [
    ("ties", {"density": 0.001}),  # k = max(1, int(0.7)) = 1
    ("breadcrumbs", {"density": 0.001}),  # target_n = 0: nothing kept
    ("breadcrumbs", {"density": 0.3, "gamma": 0.0}),  # no upper cut
    ("breadcrumbs", {"density": 0.5, "gamma": 0.6}),  # n_bot = 0: no lower cut
    ("breadcrumbs_ties", {"density": 0.999, "gamma": 0.0005}),  # both cuts among the largest
    ("dare_linear", {"density": 1.0}),  # no pruning, no rescale
])
def test_cuts_at_the_ends_are_mergekits(name, values, dtype, monkeypatch):
    base, thetas = inputs_for(name, dtype, (37, 19))
    per, shared = params_for(name, len(thetas))
    per = [dict(p, **values) for p in per]
    tensor = tensor_inputs(base, thetas, per, shared)
    assert torch.equal(streamed(METHODS[name], tensor, base),
                       mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", RESCALED)
def test_random_method_without_rescale_is_mergekits_given_our_mask(name, dtype, monkeypatch):
    base, thetas = inputs_for(name, dtype, (37, 19))
    per, shared = params_for(name, len(thetas), rescale=False)
    tensor = tensor_inputs(base, thetas, per, shared)
    ours = streamed(METHODS[name], tensor, base)
    assert torch.equal(ours, mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch))
    assert not torch.equal(ours, streamed(METHODS[name], tensor_inputs(base, thetas, per, shared, SEED + 1),
                                          base))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", RESCALED + ["ties", "slerp"])
def test_whole_tensor_sums_agree_with_mergekit_to_an_ulp(name, shape, dtype, monkeypatch):
    """The L1 rescale (DARE, DELLA, and TIES with rescale: true) and slerp's norms and angle: float64 sums of
    rows here, torch's fp32 reductions in mergekit."""
    base, thetas = inputs_for(name, dtype, shape)
    per, shared = params_for(name, len(thetas), **({} if name == "slerp" else {"rescale": True}))
    tensor = tensor_inputs(base, thetas, per, shared)
    ours = streamed(METHODS[name], tensor, base)
    theirs = mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch)
    assert_within_ulps(ours, theirs, base, 16 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("name", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("shape", [(64, 48), (300, 700)], ids=str)
def test_bf16_top_k_keeps_the_ties_mergekits_unstable_sort_keeps(name, shape, monkeypatch):
    """In bf16 many task-vector entries share a magnitude, and the top-k cut falls among them: mergekit picks by
    its unstable sort, and so do we (introsort's partitions replayed), bit for bit. The larger tensor spans
    several of the replay's chunks."""
    base, thetas = inputs_for(name, torch.bfloat16, shape, seed=3)
    per, shared = params_for(name, len(thetas))
    tensor = tensor_inputs(base, thetas, per, shared)
    ours = streamed(METHODS[name], tensor, base, rows=64)
    assert torch.equal(ours, mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch, stable=False))
    for theta, p in zip(thetas, per):  # the cut falls inside a tie, for some input at least
        magnitude = (theta - base).abs().float().flatten().sort(descending=True).values
        k = max(1, int(p["density"] * magnitude.numel()))
        if (magnitude == magnitude[k - 1]).sum() > (magnitude[:k] == magnitude[k - 1]).sum():
            return
    pytest.fail("no input has a tie at its cut")


@pytest.mark.parametrize("name", ["breadcrumbs_ties"])
def test_bf16_differs_from_mergekits_unstable_sort_only_at_tied_cuts(name, monkeypatch):
    """In bf16 many task-vector entries share a magnitude; where one sits at a breadcrumbs cut, mergekit picks by
    its unstable sort and we by index. Every element that differs has some input tied at one of its cuts."""
    base, thetas = inputs_for(name, torch.bfloat16, (64, 48), seed=3)
    per, shared = params_for(name, len(thetas))
    tensor = tensor_inputs(base, thetas, per, shared)
    ours = streamed(METHODS[name], tensor, base)
    theirs = mergekit_merge(name, base, thetas, per, shared, tensor, monkeypatch, stable=False)
    differs = (ours != theirs).flatten()
    at_cut = torch.zeros_like(differs)
    for theta, p in zip(thetas, per):
        magnitude = (theta - base).abs().float().flatten()
        ascending = magnitude.sort().values
        numel, d = magnitude.numel(), p["density"]
        if name == "breadcrumbs_ties":
            n_bot = max(0, numel - int(d * numel) - int(p["gamma"] * numel))
            cuts = [ascending[n_bot - 1], ascending[n_bot + int(d * numel) - 1]]
        else:
            cuts = [ascending[numel - max(1, int(d * numel))]]
        for cut in cuts:
            at_cut |= magnitude == cut
    assert at_cut.any()  # the case is there
    assert (at_cut | ~differs).all(), f"{int((differs & ~at_cut).sum())} of {int(differs.sum())} differences"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(METHODS))
def test_reference_merge_equals_the_streamed_fold(name, shape, dtype):
    base, thetas = inputs_for(name, dtype, shape)
    per, shared = params_for(name, len(thetas))
    tensor = tensor_inputs(base, thetas, per, shared)
    assert torch.equal(streamed(METHODS[name], tensor, base), reference_merge(METHODS[name], base, thetas, tensor))


@pytest.mark.parametrize("name", ["dare_ties", "della", "ties", "breadcrumbs", "slerp"])
def test_same_seed_same_output_whatever_the_blocks(name):
    """Masks and thresholds do not depend on where blocks start: 8-row blocks, 24-row blocks and the whole
    tensor as one block (combine.fold_tensor, as verify runs a fold) give one result. The tensor spans several
    mask chunks."""
    rows = 3 * MASK_CHUNK // 512 + 5
    base, thetas = inputs_for(name, torch.float32, (rows, 512))
    per, shared = params_for(name, len(thetas))
    tensor = tensor_inputs(base, thetas, per, shared)
    method = METHODS[name]
    whole = fold_tensor(method.fold(tensor), base).reshape(base.shape)
    assert torch.equal(streamed(method, tensor, base, 8), whole)
    assert torch.equal(streamed(method, tensor, base, 24), whole)


@pytest.mark.parametrize("rows", [8, 3])
def test_dare_fold_reads_back_the_mask_its_first_pass_drew(rows, monkeypatch):
    """With a rescale, the sums pass draws the mask and keeps it as bits; the fold draws nothing again where
    every block starts on a byte (8 rows), and draws again where one does not (3 rows of 19): one output."""
    import ftserve.merge.folds as folds

    base, thetas = inputs_for("dare_ties", torch.float32, (37, 19))
    per, shared = params_for("dare_ties", len(thetas))
    tensor = tensor_inputs(base, thetas, per, shared)
    fold, draws = METHODS["dare_ties"].fold(tensor), []
    monkeypatch.setattr(folds, "uniforms", lambda *a, **k: draws.append(fold.stage) or uniforms(*a, **k))
    weight = base.reshape(tensor.rows, -1).float()
    blocks = [(a, min(a + rows, tensor.rows)) for a in range(0, tensor.rows, rows)]
    fold.gather([fold.scan(weight[a:b].clone(), scratch, a, b) for a, b in blocks])
    out = torch.cat([fold.block(weight[a:b].clone(), scratch, a, b).clone() for a, b in blocks])
    assert draws.count(0) == 3 * len(blocks) and draws.count(1) == (0 if rows == 8 else 3 * len(blocks))
    assert torch.equal(out.reshape(base.shape), streamed(METHODS["dare_ties"], tensor, base))
    with pytest.raises(RuntimeError, match="folded every row already"):
        fold.block(weight[:8].clone(), scratch, 0, 8)


def test_dare_drops_one_minus_density_and_keeps_the_l1_norm():
    base, (theta,) = inputs_for("dare_linear", torch.float32, (256, 256), count=1)
    delta = theta - base
    for density in (0.1, 0.5, 0.9):
        per = [{"weight": 1.0, "density": density}]
        plain = streamed(METHODS["dare_linear"], tensor_inputs(base, [theta], per, {"rescale": False}),
                         base) - base
        kept = float((plain != 0).float().mean())
        assert abs(kept - density) < 0.01, (density, kept)
        rescaled = streamed(METHODS["dare_linear"], tensor_inputs(base, [theta], per, {}), base) - base
        torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)


def test_della_keeps_larger_magnitudes_more_often():
    base, (theta,) = inputs_for("della_linear", torch.float32, (128, 256), count=1)
    per = [{"weight": 1.0, "density": 0.5, "epsilon": 0.3}]
    tensor = tensor_inputs(base, [theta], per, {"rescale": False})
    kept = streamed(METHODS["della_linear"], tensor, base) != base
    order = (theta - base).abs().argsort(dim=1)
    by_rank = kept.gather(1, order).float().mean(dim=0)  # keep rate per magnitude rank within a row
    assert abs(float(kept.float().mean()) - 0.5) < 0.01
    assert float(by_rank[:32].mean()) < 0.28 and float(by_rank[-32:].mean()) > 0.72


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_magnitude_cut_inside_a_tie_takes_the_ties_mergekits_sort_takes(dtype):
    """The k-th magnitude is tied across several blocks: all larger ones are kept, then the tied ones that
    mergekit's ``argsort(descending=True)`` puts first (not index order). One input of weight 1, so the kept
    task vector is what comes out."""
    rows, cols = 40, 3
    delta = torch.full((rows, cols), 0.5)
    delta[::7] = -2.0  # 18 larger, 6 rows of 3
    delta[5, 1] = delta[30, 2] = 0.25  # 2 smaller
    base = torch.zeros(rows, cols, dtype=dtype)
    per = [{"weight": 1.0, "density": 0.5}]  # k = 60: 18 larger, then 42 of the 100 tied at 0.5
    tensor = tensor_inputs(base, [delta.to(dtype)], per, {})
    ours = streamed(METHODS["ties"], tensor, base)
    expected = torch.zeros(rows * cols)
    flat = delta.flatten()
    expected[flat == -2.0] = -2.0
    kept = torch.argsort(flat.abs(), descending=True)[:60]
    expected[kept[flat[kept] == 0.5]] = 0.5
    assert not torch.equal(expected[flat == 0.5], (flat == 0.5).cumsum(0)[flat == 0.5].le(42).float() / 2)
    assert torch.equal(ours.float().flatten(), expected)


def test_fp32_threshold_between_keys_sharing_their_high_bits():
    """fp32 keys are resolved in two passes: magnitudes 1 + i ulp share their high 15 bits, so the second
    pass (the low 16) decides; shuffled, so that the kept ones are scattered over the blocks."""
    numel = 30 * 11
    values = (1 + torch.arange(numel, dtype=torch.float64) * 2.0**-23).float()
    values = values[torch.randperm(numel, generator=torch.Generator().manual_seed(0))].view(30, 11)
    base = torch.zeros(30, 11)
    per = [{"weight": 1.0, "density": 0.3}]
    ours = streamed(METHODS["ties"], tensor_inputs(base, [values], per, {}), base)
    k = int(0.3 * numel)
    assert torch.equal(ours != 0, values >= values.flatten().sort().values[numel - k])


def test_magnitude_prune_is_peft_arithmetic_on_task_vectors():
    base, thetas = inputs_for("magnitude_prune", torch.float32, (37, 19))
    per, shared = params_for("magnitude_prune", 3)
    per = [dict(p, density=0.4) for p in per]  # PEFT takes one density
    ours = streamed(METHODS["magnitude_prune"], tensor_inputs(base, thetas, per, shared), base)
    peft = merge_utils.magnitude_prune([t - base for t in thetas], torch.tensor(WEIGHTS), 0.4)
    assert torch.equal(ours, base + peft)


def test_int8_mask_changes_nothing():
    base, thetas = inputs_for("ties", torch.bfloat16, (37, 19))
    per, shared = params_for("ties", 3)
    plain = streamed(METHODS["ties"], tensor_inputs(base, thetas, per, shared), base)
    assert torch.equal(plain, streamed(METHODS["ties"], tensor_inputs(base, thetas, per, {"int8_mask": True}),
                                       base))


def test_slerp_ends_at_its_inputs():
    base, (theta,) = inputs_for("slerp", torch.bfloat16, (37, 19))
    at = {t: streamed(METHODS["slerp"], tensor_inputs(base, [theta], [{}], {"t": t}), base) for t in (0, 1)}
    assert torch.equal(at[0], base)
    assert_within_ulps(at[1], theta, theta, 1)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "magnitude_prune"])
def test_parameters_and_contract_are_mergekits(name):
    ours, theirs = METHODS[name], registry.get(name).spec
    assert {p.name: (p.per_input, p.default) for p in ours.params} == {
        p.name: (p.scope != ParameterScope.SHARED, REQUIRED if p.default is MISSING else p.default)
        for p in theirs.parameters}
    assert ours.needs_base == (theirs.contract.base == BasePolicy.REQUIRED)
    assert (ours.min_inputs, ours.max_inputs) == (theirs.contract.min_inputs, theirs.contract.max_inputs)
    assert ours.title == theirs.pretty_name and ours.reference == theirs.reference_url


@pytest.mark.parametrize("name, per, shared, message", [
    ("ties", [{"weight": 1.0, "gamma": 0.1}], {}, "ties has no per-model parameter 'gamma' (input 0)"),
    ("ties", [{"weight": 1.0}], {"density": 0.5}, "ties has no shared parameter 'density'"),
    ("ties", [{"density": 0.5}], {}, "ties needs 'weight' for input 0"),
    ("slerp", [{}], {}, "slerp needs 't' in parameters"),
    ("ties", [{"weight": 1.0, "density": 0.0}], {},
     "density (input 0) must lie in (0, 1], got 0.0 (mergekit would silently treat it as dropping the whole task"),
    ("dare_ties", [{"weight": 1.0, "density": 1.5}], {},
     "must lie in (0, 1], got 1.5 (mergekit would silently treat it as no pruning)"),
    ("ties", [{"weight": "0.5"}], {}, "ties: weight (input 0) must be a number, got '0.5'"),
    ("ties", [{"weight": 1.0}], {"normalize": "yes"}, "ties: normalize (parameters) must be true or false"),
    ("slerp", [{}], {"t": 1.5}, "slerp: t (parameters) must lie in [0, 1], got 1.5"),
    ("slerp", [{}, {}, {}], {"t": 0.5}, "slerp merges exactly 2 models counting the base, got 4"),
    ("della", [{"weight": 1.0, "density": 0.9, "epsilon": 0.2}], {},
     "della: input 0 has density 0.9 and epsilon 0.2; density - epsilon and density + epsilon must both lie in"),
    ("breadcrumbs", [{"weight": 1.0, "gamma": -0.1}], {}, "gamma (input 0) must lie in [0, 1], got -0.1"),
    ("linear", [{"weight": 1.0}, {"weight": -1.0}], {}, "linear: the weights sum to 0, so normalize divides by zero"),
    ("task_arithmetic", [{"weight": float("nan")}], {}, "weight (input 0) must be finite"),
])
def test_bad_parameters_are_refused_in_one_line(name, per, shared, message):
    with pytest.raises(ConfigError) as caught:
        METHODS[name].check(per, shared)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("shape", [(7, 1), (1,)], ids=str)
def test_della_refuses_a_tensor_with_nothing_to_rank(shape):
    """DELLA ranks each slice along dim 1 (a 1-D tensor as one slice); mergekit fails on a slice of one element
    (a NaN probability), we say so when the fold is planned."""
    base, thetas = inputs_for("della", torch.float32, shape)
    per, shared = params_for("della", len(thetas))
    with pytest.raises(ConfigError, match=r"della: .* has shape \[.*\], and DELLA ranks magnitudes along its second"):
        METHODS["della"].fold(tensor_inputs(base, thetas, per, shared))


def test_the_base_needs_no_per_model_values_when_listed():
    METHODS["ties"].check([{}, {"weight": 1.0}], {}, base_index=0)
    METHODS["slerp"].check([{}, {}], {"t": 0.5}, base_index=0)
    with pytest.raises(ConfigError, match="slerp merges exactly 2 models counting the base, got 3"):
        METHODS["slerp"].check([{}, {}], {"t": 0.5})


def test_unknown_and_unsupported_methods_are_named():
    with pytest.raises(ConfigError, match="unknown merge method 'tie'; use one of: linear, task_arithmetic, ties"):
        get_merge_method("tie")
    for name in NOT_SUPPORTED:
        with pytest.raises(ConfigError, match=f"'{name}' is mergekit's, but ftserve does not support it"):
            get_merge_method(name)
    assert set(NOT_SUPPORTED) | set(METHODS) - {"magnitude_prune"} == {m.spec.name for m in
                                                                      registry.registered_methods()}
