"""Verify a merged model against the unmerged adapter model it came from.

Every model runs in fp32 on the same prompts, each prompt extended by the exact reference's greedy tokens.
The exact reference is the adapter folder loaded natively (``load_adapter``: the unmerged forward, a row-scaled
form's ``r * (W x + s B A x)`` included) for one adapter of weight 1 under the weighted sum; otherwise (several
adapters, other weights, another combiner) the base model with every targeted weight replaced by the merge's
own combination of its adapters, computed in fp32 over the whole tensor (``combine.fold_tensor``: the combiner
that the merge used, so nothing here assumes that deltas add).

A merge stores ``round(W + delta)`` in its dtype, and for a 16-bit dtype that rounding alone moves the logits by
more than any fixed tolerance can tell from a wrong merge. So the merged model is judged against what its
dtype implies: for float32 weights, against the exact reference; for 16-bit weights, against the *rounded*
reference, the base with the adapters combined in fp32 as above and each weight rounded to the dtype the merged
file stores it in (rounding once, as a correct merge does). With ``z`` the logits of the reference judged against
and ``z'`` the merged model's, over all positions::

    diff = max |z' - z|,      tolerance = 1e-3 * max(1, max |z|)

The report also gives what the rounding alone costs (``max |z_rounded - z_exact|``), so a user sees why a
16-bit merge differs from the adapter model. Greedy tokens agree where ``argmax z' = argmax z``; a position
where they differ counts as a disagreement only when the reference prefers its own token by more than the
tolerance (``z[top] - z[top'] > tolerance``), otherwise it is a near-tie. The merge passes when
``diff <= tolerance`` and there is no disagreement.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from ..files.checkpoint import FLOATS, open_checkpoint, resolve_base
from .combine import Combiner, Part, WeightedSum, fold_tensor
from .plan import AdapterSpec, alone_if_row_scaled

RTOL = 1e-3  # fp32 arithmetic in a different order, on the same weights
PROMPTS = ("The quick brown fox jumps over the lazy dog.", "Once upon a time, in a small village,",
           "def fibonacci(n):")


@dataclass
class VerifyReport:
    max_abs_diff: float
    tolerance: float
    positions: int
    disagreements: int
    near_ties: int
    dtype: str
    rounding_diff: float | None = None  # what rounding to ``dtype`` alone moves the logits; None for float32

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.disagreements == 0

    @property
    def judged_against(self) -> str:
        if self.rounding_diff is None:
            return "base + adapters in float32"
        return (f"base + adapters folded in float32 and rounded to {self.dtype} as stored (the rounding alone "
                f"moves the logits by up to {self.rounding_diff:.3g})")

    def summary(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"{verdict}: largest logit difference {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}) "
                f"against {self.judged_against}; greedy tokens agree at "
                f"{self.positions - self.disagreements - self.near_ties}/{self.positions} positions, "
                f"{self.near_ties} near-ties, {self.disagreements} disagreements")


def verify_merge(base: str | os.PathLike, adapters: list[AdapterSpec], merged: str | os.PathLike,
                 prompts: tuple[str, ...] = PROMPTS, new_tokens: int = 8,
                 combiner: Combiner | None = None) -> VerifyReport:
    """Compare the merged folder with base + adapters on ``prompts``, combined by ``combiner`` (the merge's;
    default: the weighted sum); see the module docstring."""
    from transformers import AutoModelForCausalLM

    combiner = combiner or WeightedSum()
    base_path = resolve_base(base)
    merged_path = resolve_base(merged)
    open_checkpoint(base_path)  # refuse a base whose shards and index disagree (shard_index.py) before loading it
    stored = _stored_dtypes(merged_path)
    dtype = max(stored.values(), key=list(stored.values()).count) if stored else torch.float32
    load = functools.partial(AutoModelForCausalLM.from_pretrained, dtype=torch.float32)
    candidate = load(merged_path).eval()
    exact = _reference_model(load(base_path), adapters, combiner)
    with torch.no_grad():
        ids = [_greedy(exact, p, new_tokens) for p in _prompt_ids(prompts, merged_path, base_path,
                                                                  candidate.config.vocab_size)]
        z_exact = [exact(input_ids=x).logits[0] for x in ids]
        del exact
        rounding_diff, z_ref = None, z_exact
        if any(d != torch.float32 for d in stored.values()):
            model = load(base_path)
            rounded = _combined_model(model, _module_parts(model, adapters), combiner, stored, dtype)
            z_ref = [rounded(input_ids=x).logits[0] for x in ids]
            rounding_diff = max(float((a - b).abs().max()) for a, b in zip(z_ref, z_exact))
            del rounded
        z_merged = [candidate(input_ids=x).logits[0] for x in ids]
    diff = max(float((a - b).abs().max()) for a, b in zip(z_merged, z_ref))
    tolerance = RTOL * max(1.0, max(float(z.abs().max()) for z in z_ref))
    positions = disagreements = near_ties = 0
    for z, z2 in zip(z_ref, z_merged):
        top, top2 = z.argmax(-1), z2.argmax(-1)
        positions += len(top)
        for i in torch.nonzero(top != top2).flatten().tolist():
            if float(z[i, top[i]] - z[i, top2[i]]) > tolerance:
                disagreements += 1
            else:
                near_ties += 1
    return VerifyReport(diff, tolerance, positions, disagreements, near_ties, str(dtype).removeprefix("torch."),
                        rounding_diff)


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _reference_model(model, adapters: list[AdapterSpec], combiner: Combiner):
    from ..model import load_adapter

    parts = _module_parts(model, adapters)
    if len(adapters) == 1 and adapters[0].weight == 1.0 and isinstance(combiner, WeightedSum):
        return load_adapter(model, adapters[0].path).eval()
    return _combined_model(model, parts, combiner)


@torch.no_grad()
def _combined_model(model, parts: dict[str, list[Part]], combiner: Combiner,
                    stored: dict[str, torch.dtype] | None = None, dtype: torch.dtype | None = None):
    """The base with every targeted weight folded by ``combiner`` in fp32; with ``stored``, each weight then
    rounded once to the dtype the merged checkpoint stores it in (``dtype`` for a name it lacks, such as a tied
    output embedding)."""
    for name, module_parts in parts.items():
        layer = model.get_submodule(name)
        transposed = not isinstance(layer, torch.nn.Linear)  # Conv1D stores (d_in, d_out)
        folded = fold_tensor(combiner.fold(module_parts, transposed), layer.weight)
        layer.weight = torch.nn.Parameter(folded, requires_grad=False)  # a new tensor: unties a tied embedding
    if stored is not None:
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(stored.get(name, dtype)))
    return model.eval()


def _module_parts(model, adapters: list[AdapterSpec]) -> dict[str, list[Part]]:
    """Every module an adapter targets, with its adapters as the merge's combiner receives them."""
    from ..files.adapter_folder import read_adapter
    from ..methods.base import linear_shape

    folders = [(spec, read_adapter(spec.path)) for spec in adapters]
    alone_if_row_scaled(folders)
    per_module: dict[str, list[Part]] = {}
    for spec, folder in folders:
        sizes = {name: linear_shape(model.get_submodule(name))[1] for name in folder.modules}
        for name, f in folder.lora_factors(sizes).items():
            per_module.setdefault(name, []).append(Part.of(spec.weight, f))
    return per_module


def _stored_dtypes(path) -> dict[str, torch.dtype]:
    return {name: entry.dtype for name, entry in open_checkpoint(path).tensors.items() if entry.dtype in FLOATS}


def _prompt_ids(prompts, merged_path, base_path, vocab_size: int) -> list[torch.Tensor]:
    """Token ids from the merged (else the base) tokenizer; fixed random ids when neither has one. A folder with
    no tokenizer files may still give a tokenizer (built from config.json alone, with an empty vocabulary) that
    turns every prompt into no ids: that counts as none."""
    from transformers import AutoTokenizer

    for path in (merged_path, base_path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            continue
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        if all(ids):
            return [torch.tensor([i]) for i in ids]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 12), generator=generator) for _ in prompts]


@dataclass
class ModelsReport:
    """A model merge recomputed tensor by tensor: per tensor that differs, its largest absolute difference."""

    method: str
    tensors: int
    differ: dict[str, float]
    missing: list[str]

    @property
    def passed(self) -> bool:
        return not self.differ and not self.missing

    def summary(self) -> str:
        if self.passed:
            return f"OK: all {self.tensors} tensors equal {self.method} recomputed by its reference"
        worst = sorted(self.differ.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{name} (max abs diff {diff:.3g})" for name, diff in worst[:5])
        more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        lost = f"; missing from the merge: {', '.join(self.missing[:5])}" if self.missing else ""
        return (f"FAILED: {len(self.differ)} of {self.tensors} tensors differ from {self.method} recomputed by its "
                f"reference: {listed}{more}{lost}")


def verify_models(merged: str | os.PathLike, request, allow_pickle: bool = False) -> ModelsReport:
    """Recompute every tensor of the model merge ``request`` with the method's ``reference_merge`` (whole
    tensors, a second implementation of the streamed fold) from the same inputs, and compare it with the one
    ``merged`` stores: same dtype, same values."""
    from contextlib import ExitStack

    from ..files.checkpoint import TensorReader
    from .inputs import plan_models
    from .methods import get_merge_method, reference_merge

    plan = plan_models(request, allow_pickle=allow_pickle)
    method = get_merge_method(request.method)
    stored = open_checkpoint(resolve_base(merged))
    differ: dict[str, float] = {}
    missing: list[str] = []
    with TensorReader(plan.checkpoint) as base_reader, TensorReader(stored) as merged_reader, ExitStack() as stack:
        for reader in plan.readers:
            stack.enter_context(reader)
        for t in plan.tensors:
            entry = stored.tensors.get(t.name)
            if entry is None:
                missing.append(t.name)
                continue
            rows = t.source.rows
            base = base_reader.read_rows(t.source, 0, rows)
            if t.inputs is None:
                expected = base
            else:
                base = base.float()
                thetas = [r.rows(base, 0, rows) for r in t.inputs.inputs]
                expected = reference_merge(method, base, thetas, t.inputs).reshape(rows, -1).to(t.dtype)
            got = merged_reader.read_rows(entry, 0, entry.rows)
            if got.dtype != expected.dtype or got.shape != expected.shape:
                differ[t.name] = math.inf
            elif not torch.equal(got, expected):
                differ[t.name] = float((got.double() - expected.double()).abs().nan_to_num(math.inf).max())
    return ModelsReport(method.name, len(plan.tensors), differ, missing)
