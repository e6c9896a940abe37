"""Merge, to an adapter: several adapters become one new plain LoRA, without a base model or a merged checkpoint.

The semantics are PEFT's ``LoraModel.add_weighted_adapter`` (0.22), module by module, over each adapter's
served form ``(A_k, B_k, s_k)`` (``AdapterFolder.lora_factors``: LoRA, LoRA-FA, LoRA+, VeRA and Delta-LoRA all
have exact plain factors) with merge weights ``w_k``. Only the adapters that target a module take part in it.

``cat`` (exact; rank = the sum of the ranks)::

    A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...]      B' = [B_1, B_2, ...]      B' A' = sum_k w_k s_k B_k A_k

``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (every adapter of the same rank) combine
the A's and, apart, the B's, each as a task vector, with ``w_k s_k`` split over the two factors (its sign on A)::

    A' = combine(A_k, sign(w_k s_k) sqrt|w_k s_k|)      B' = combine(B_k, sqrt|w_k s_k|)

``svd`` and ``<method>_svd`` combine the dense deltas ``Delta_k = s_k B_k A_k`` with the weights ``w_k`` and
truncate the result to rank ``R`` (default: the largest input rank; never above ``min(d_out, d_in)``, where
the truncation is exact)::

    Delta = combine(Delta_k, w_k) = U S V^T      B' = U_R S_R      A' = V_R^T

optionally clamped (PEFT's ``svd_clamp``): both factors to ``[-q, q]``, ``q`` the ``clamp`` quantile of all
their values together. ``svd``'s combination is the weighted sum, whose rank is at most the sum of the input
ranks: it is truncated through ``cat``'s factors (``_factored_svd``), exactly and without a dense SVD; the
pruning methods' combinations are of full rank, and take PEFT's dense SVD. The new adapter has scale 1
(``lora_alpha = r``), as PEFT's, and is written in fp32.

``combine`` (``peft.utils.merge_utils``): ``linear`` sums ``w_k x_k``. ``magnitude_prune`` first keeps the
``int(density * numel)`` largest ``|x_k|`` of each input (the tied ones at the cut in flat index order: same
result on every machine). ``dare_*`` (DARE, arXiv:2311.03099) keep each element with probability ``density`` and
divide the kept ones by it. ``ties`` / ``dare_ties`` (TIES, arXiv:2306.01708) then elect a sign per element from
the pruned, *unweighted* inputs (``total``: the sign of their sum; ``frequency``: of their count of signs; zero
counts as +) and average the weighted values that agree with it, over how many agree.

DARE's draws: each module has its own generator, ``torch.Generator().manual_seed(h)``,
``h = blake2b(f"{seed}\\0{module}")`` (``module_seed``); it draws PEFT's Bernoulli masks in PEFT's order (the
A's of every input, then the B's; or the deltas, in PEFT's orientation, transposed for ``fan_in_fan_out``).
PEFT draws from the global generator module after module in the model's order, which a merge without the model
cannot know; per-module generators give the same output for the same seed on any machine, and for one module
the same as PEFT after ``torch.manual_seed(module_seed(seed, module))``.

Where PEFT differs, on purpose: one input runs the method asked (PEFT silently turns it into ``linear``), so a
one-adapter ``svd`` is a rank reduction; a density outside (0, 1], a rank below 1, a parameter the method does not
take, a row-scaled adapter (DoRA) and adapters of different layer shapes are one-line errors before anything is
written; mixed target lists are fine (PEFT refuses only a regex beside a list; we write the modules there are,
``target_modules`` their last names).

Each module's relative error ``||Delta_ref - B' A'||_F / ||Delta_ref||_F`` (0 for a zero reference) is returned
and recorded in the card, against the dense combination for ``svd`` / ``*_svd`` (what the truncation lost) and
against the plain weighted sum ``sum_k w_k s_k B_k A_k`` for the rest (what the method changed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..config import EXTRA_KEY
from ..errors import AdapterFileError, ConfigError
from ..files.adapter_folder import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SETTINGS, AdapterFolder, plain_lora,
                                    read_adapter, row_scaled_reason)
from ..files.atomic import OUTPUT_FILE_MODE, atomic_output_dir
from ..files.checkpoint import Checkpoint, module_in_features, open_checkpoint, resolve_base
from ..methods import LoraFactors
from .plan import AdapterSpec

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # on A and B apart, equal ranks
DENSE_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *DENSE_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combination:
    """How task vectors combine (``combine`` in the module docstring), and the parameters it takes."""

    prune: str | None  # "magnitude", "random" (DARE) or None
    elect_sign: bool   # TIES' sign election and disjoint mean

    @classmethod
    def of(cls, method: str) -> "Combination":
        name = method.removesuffix("_svd")
        prune = "random" if name.startswith("dare_") else "magnitude" if name in ("ties", "magnitude_prune") else None
        return cls(prune, name.endswith("ties"))

    def combine(self, tensors: list[Tensor], weights: list[float], density: float | None, sign_method: str,
                generator: torch.Generator) -> Tensor:
        """The combination of same-shaped fp32 ``tensors`` with ``weights``."""
        if self.prune == "magnitude":
            tensors = [keep_largest(t, density) for t in tensors]
        elif self.prune == "random":
            tensors = [_drop_at_random(t, density, generator) for t in tensors]
        stacked = torch.stack(tensors)
        weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * tensors[0].dim())
        if not self.elect_sign:
            return weighted.sum(dim=0)
        votes = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
        agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def keep_largest(x: Tensor, density: float) -> Tensor:
    """``x`` with all but its ``k = int(density * numel)`` largest magnitudes zeroed: those above the k-th
    largest, then those equal to it in flat index order until ``k`` (so the result is the same on every machine;
    PEFT's ``topk`` picks among such ties as its kernel happens to). Density 1 keeps all."""
    if density >= 1:
        return x
    magnitude = x.abs().flatten()
    k = int(density * magnitude.numel())
    if k == 0:
        return torch.zeros_like(x)
    cut = magnitude.kthvalue(magnitude.numel() - k + 1).values
    keep = magnitude > cut
    tied = magnitude == cut
    keep |= tied & (tied.cumsum(0) <= k - int(keep.sum()))
    return (x.flatten() * keep).view_as(x)


def _drop_at_random(x: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: each element kept with probability ``density`` (PEFT's Bernoulli draw) and the kept ones divided by
    it, so that the expected value is ``x``. Density 1 draws nothing and keeps all, as PEFT."""
    if density >= 1:
        return x
    return x * torch.bernoulli(torch.full_like(x, density), generator=generator) / density


def module_seed(seed: int, module: str) -> int:
    """The seed of ``module``'s generator for DARE's draws: 63 bits of blake2b over the seed and the name."""
    digest = hashlib.blake2b(f"{seed}\0{module}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class AdapterMerge:
    """What ``merge_to_adapter`` wrote: per module, its rank and its relative error (see the module docstring)."""

    out_dir: Path
    method: str
    parameters: dict[str, object]  # the method's parameters as used (density, rank, seed, ...)
    inputs: list[tuple[AdapterSpec, str]]  # each input and its adapter method
    ranks: dict[str, int]
    errors: dict[str, float]
    reference: str  # what the errors compare B' A' with

    def lines(self) -> list[str]:
        """What the command line prints: a summary, then the worst layers."""
        worst = sorted(self.errors.items(), key=lambda item: -item[1])
        settings = ", ".join(f"{k}={v}" for k, v in self.parameters.items())
        head = [f"merged {len(self.inputs)} adapter(s) by {self.method} ({settings}) into {self.out_dir}: "
                f"{len(self.ranks)} module(s), rank {_rank_range(self.ranks)}",
                f"relative error against {self.reference}: max {worst[0][1]:.3g}, mean "
                f"{sum(self.errors.values()) / len(self.errors):.3g}"]
        return head + [f"  {module}: {error:.3g}" for module, error in worst[:5]]


def run_adapter_merge(inputs: list[str], out_dir: str | os.PathLike, *, weights: list[float] | None = None,
                      **options) -> list[str]:
    """``ftserve merge --output-kind adapter``: ``inputs`` as written (``DIR`` or ``DIR:WEIGHT``), or with
    ``weights`` (``--weights``, one per input), the other options as ``merge_to_adapter``'s; returns the lines
    to print."""
    specs = [AdapterSpec.parse(text) for text in inputs]
    if weights is not None:
        if any(str(spec.path) != text for spec, text in zip(specs, inputs)):
            raise ConfigError("give weights either as ADAPTER:WEIGHT or with --weights, not both")
        if len(weights) != len(specs):
            raise ConfigError(f"--weights gives {len(weights)} weight(s) for {len(specs)} adapter(s); give one per "
                              f"adapter")
        specs = [AdapterSpec(spec.path, float(weight)) for spec, weight in zip(specs, weights)]
    return merge_to_adapter(specs, out_dir, **options).lines()


def merge_to_adapter(adapters: list[AdapterSpec], out_dir: str | os.PathLike, *, method: str = "svd",
                     rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
                     clamp: float | None = None, seed: int = 0, base: str | os.PathLike | None = None,
                     force: bool = False, allow_pickle: bool = False) -> AdapterMerge:
    """Write the adapter that PEFT's ``add_weighted_adapter(combination_type=method, svd_rank=rank,
    svd_clamp=clamp, density=density, majority_sign_method=...)`` makes of ``adapters`` (see the module
    docstring) to ``out_dir``, a PEFT LoRA folder with a card. ``base`` (a folder or hub id) is optional: given,
    every module's shape is checked against it and it is the recorded base; VeRA folders without recorded layer
    sizes need it. ConfigError / AdapterFileError / CheckpointError, one line, before anything is written."""
    parameters = _check_parameters(method, adapters, rank, density, majority_sign_method, clamp, seed)
    if Path(out_dir).exists() and not force:
        raise ConfigError(f"{out_dir} already exists; pass force=True to replace it")
    folders = [(spec, read_adapter(spec.path, allow_pickle=allow_pickle)) for spec in adapters]
    base_name, fan_in_fan_out = _check_folders(folders, base)
    per_module = _factors_by_module(folders, base)
    if method in FACTOR_METHODS:
        _check_equal_ranks(method, per_module)
    if method in DENSE_METHODS:
        rank = rank or max(f.rank for parts in per_module.values() for _, f in parts)
        parameters["rank"] = rank
    combination = Combination.of(method)
    merged, errors = {}, {}
    for module, parts in per_module.items():
        generator = torch.Generator().manual_seed(module_seed(seed, module))
        if method == "svd":
            joined = _cat(parts)
            target = joined.low_rank_weight()
            merged[module] = _truncate(*_factored_svd(joined.B, joined.A), rank, clamp)
        elif method in DENSE_METHODS:
            target = _dense_merge(combination, parts, density, majority_sign_method, generator, fan_in_fan_out)
            merged[module] = _truncate(*torch.linalg.svd(target, full_matrices=False), rank, clamp)
        else:
            target = _weighted_sum(parts)
            merged[module] = _cat(parts) if method == "cat" else \
                _factor_merge(combination, parts, density, majority_sign_method, generator)
        problem = merged[module].non_finite()
        if problem:
            raise ConfigError(f"module {module}: the merged adapter overflows fp32 ({problem}); lower the weights")
        errors[module] = relative_error(target, merged[module])
    reference = ("the method's combination of the input deltas, which the SVD truncates" if method in DENSE_METHODS
                 else "the weighted sum of the input deltas, sum_k w_k s_k B_k A_k")
    result = AdapterMerge(Path(out_dir), method, parameters, [(spec, f.config.method) for spec, f in folders],
                          {m: f.rank for m, f in merged.items()}, errors, reference)
    _write(result, merged, folders[0][1], base_name, fan_in_fan_out, force)
    return result


def relative_error(reference: Tensor, factors: LoraFactors) -> float:
    """``||reference - s B A||_F / ||reference||_F``, 0 for a zero reference."""
    norm = torch.linalg.matrix_norm(reference)
    residual = torch.linalg.matrix_norm(reference - factors.low_rank_weight())
    return float(residual / norm) if norm > 0 else 0.0


def _check_parameters(method: str, adapters: list[AdapterSpec], rank: int | None, density: float | None,
                      majority_sign_method: str, clamp: float | None, seed: int) -> dict[str, object]:
    """The parameters the method uses, checked; a ConfigError naming the first one that is wrong."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} for an adapter output; give one of {', '.join(METHODS)}")
    if not adapters:
        raise ConfigError("give at least one adapter to merge")
    combination = Combination.of(method)
    svd = method in DENSE_METHODS
    given = {"rank": rank, "clamp": clamp, "density": density}
    takes = {"rank": svd, "clamp": svd, "density": combination.prune is not None}
    for name, value in given.items():
        if value is not None and not takes[name]:
            raise ConfigError(f"method {method} does not take {name}={value}; "
                              f"{'only svd and the *_svd methods do' if name != 'density' else 'leave it out'}")
    if combination.prune is not None and density is None:
        raise ConfigError(f"method {method} needs a density, the fraction of each input to keep, in (0, 1]")
    if density is not None and not 0 < density <= 1:
        raise ConfigError(f"density={density} is outside (0, 1]: it is the fraction of each input kept")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank={rank!r} is not a rank: give a whole number of at least 1")
    if clamp is not None and not 0 < clamp <= 1:
        raise ConfigError(f"clamp={clamp} is outside (0, 1]: it is the quantile of the factors' values kept")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not a seed: give a whole number of at least 0")
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method={majority_sign_method!r}: give one of {', '.join(SIGN_METHODS)}")
    parameters: dict[str, object] = {"weights": [spec.weight for spec in adapters]}
    if combination.prune is not None:
        parameters["density"] = density
    if combination.elect_sign:
        parameters["majority_sign_method"] = majority_sign_method
    if combination.prune == "random":
        parameters["seed"] = seed
    if clamp is not None:
        parameters["clamp"] = clamp
    return parameters


def _check_folders(folders: list[tuple[AdapterSpec, AdapterFolder]],
                   base: str | os.PathLike | None) -> tuple[str | None, bool]:
    """The base to record and the common ``fan_in_fan_out``; refuses a row-scaled adapter, adapters recording
    different bases (unless ``base`` is given) and adapters that disagree on ``fan_in_fan_out``."""
    for spec, folder in folders:
        if folder.config.adapter_method.row_scaled:
            raise AdapterFileError(f"{spec.path}: cannot be merged into an adapter: {row_scaled_reason(folder.config)}")
    flags = {bool(folder.raw_config.get("fan_in_fan_out", False)) for _, folder in folders}
    if len(flags) > 1:
        raise AdapterFileError("the adapters disagree on fan_in_fan_out (whether the base stores weights "
                               "transposed, as GPT-2's Conv1D): they are not for the same model")
    recorded = {str(f.config.base_model_name_or_path): spec.path for spec, f in folders
                if f.config.base_model_name_or_path}
    if base is None and len({Path(name).name for name in recorded}) > 1:
        (a, path_a), (b, path_b) = list(recorded.items())[:2]
        raise AdapterFileError(f"{path_a} records base {a!r} and {path_b} records {b!r}; give the base model to "
                               f"check every layer's shape against it and to record it")
    name = str(base) if base is not None else next(iter(recorded), None)
    return name, flags.pop()


def _factors_by_module(folders: list[tuple[AdapterSpec, AdapterFolder]], base: str | os.PathLike | None
                       ) -> dict[str, list[tuple[float, LoraFactors]]]:
    """Per module (in first-seen order), the (weight, served form) of every adapter targeting it, each finite
    and of the same (d_out, d_in) as the others and as the base's weight, when given."""
    shapes: dict[str, tuple[tuple[int, int], Path]] = {}
    per_module: dict[str, list[tuple[float, LoraFactors]]] = {}
    checkpoint = open_checkpoint(resolve_base(base)) if base is not None else None
    for spec, folder in folders:
        sizes = module_in_features(base, sorted(folder.modules)) if base is not None else None
        for module, factors in folder.lora_factors(sizes).items():
            problem = factors.non_finite()
            if problem:
                raise AdapterFileError(f"{spec.path}: module {module}: {problem}; the adapter is corrupt or its "
                                       f"training diverged")
            shape = (factors.B.shape[0], factors.A.shape[1])
            if checkpoint is not None and shape not in (stored := _stored_shape(checkpoint, module, base),
                                                        stored[::-1]):
                raise AdapterFileError(f"{spec.path}: module {module} is {shape[0]} x {shape[1]}, but the base "
                                       f"{base} stores its weight as {stored[0]} x {stored[1]}: the adapter is not "
                                       f"for this model")
            seen, where = shapes.setdefault(module, (shape, spec.path))
            if seen != shape:
                raise AdapterFileError(f"{spec.path}: module {module} is {shape[0]} x {shape[1]}, but {seen[0]} x "
                                       f"{seen[1]} in {where}: the adapters are not for the same model")
            per_module.setdefault(module, []).append((spec.weight, factors))
    return per_module


def _stored_shape(checkpoint: Checkpoint, module: str, base: str | os.PathLike) -> tuple[int, int]:
    """The shape ``module``'s weight is stored in, in the base: (d_out, d_in), or (d_in, d_out) for GPT-2's
    Conv1D."""
    for name in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight"):
        entry = checkpoint.tensors.get(name)
        if entry is not None and len(entry.shape) == 2:
            return tuple(entry.shape)
    raise AdapterFileError(f"module {module} has no 2-D weight {module}.weight in the base {base}; is the adapter "
                           f"for another model?")


def _check_equal_ranks(method: str, per_module: dict[str, list[tuple[float, LoraFactors]]]) -> None:
    for module, parts in per_module.items():
        ranks = sorted({f.rank for _, f in parts})
        if len(ranks) > 1:
            raise ConfigError(f"method {method} combines the factors A and B themselves, so the adapters need the "
                              f"same rank; module {module} has ranks {ranks}: use cat, svd or a *_svd method")


def _weighted_sum(parts: list[tuple[float, LoraFactors]]) -> Tensor:
    return sum(weight * f.low_rank_weight() for weight, f in parts)


def _cat(parts: list[tuple[float, LoraFactors]]) -> LoraFactors:
    A = torch.cat([f.A.float() * (weight * f.scale) for weight, f in parts])
    return LoraFactors(A, torch.cat([f.B.float() for _, f in parts], dim=1), 1.0)


def _factor_merge(combination: Combination, parts: list[tuple[float, LoraFactors]], density: float | None,
                  sign_method: str, generator: torch.Generator) -> LoraFactors:
    roots = [math.sqrt(abs(weight * f.scale)) for weight, f in parts]
    signs = [1.0 if weight * f.scale >= 0 else -1.0 for weight, f in parts]
    A = combination.combine([f.A.float() for _, f in parts], [r * s for r, s in zip(roots, signs)], density,
                            sign_method, generator)
    B = combination.combine([f.B.float() for _, f in parts], roots, density, sign_method, generator)
    return LoraFactors(A, B, 1.0)


def _dense_merge(combination: Combination, parts: list[tuple[float, LoraFactors]], density: float | None,
                 sign_method: str, generator: torch.Generator, fan_in_fan_out: bool) -> Tensor:
    """The combined dense delta (d_out, d_in); combined in PEFT's orientation, so that DARE's draws fall as
    PEFT's do (transposed where the base stores the weight transposed)."""
    deltas = [f.low_rank_weight() for _, f in parts]
    if fan_in_fan_out:
        deltas = [d.T for d in deltas]
    merged = combination.combine(deltas, [weight for weight, _ in parts], density, sign_method, generator)
    return merged.T if fan_in_fan_out else merged


def _factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``U S V^T`` of ``B @ A`` (B: d_out x r, A: r x d_in) without forming it, in
    ``O((d_out + d_in) r^2)``: with ``B = Q_B R_B`` and ``A^T = Q_A R_A``, ``B A = Q_B (R_B R_A^T) Q_A^T``, so
    the SVD of the small core ``R_B R_A^T = U' S V'^T`` gives ``U = Q_B U'``, ``V = Q_A V'``. Exact: the sum of
    several LoRAs has rank at most the sum of their ranks, which is all a dense SVD of it would find. In fp64,
    which costs little at these sizes, so the truncation is the exact one rounded to fp32."""
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.T.double())
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return (Q_B @ U).float(), S.float(), (Vh @ Q_A.T).float()


def _truncate(U: Tensor, S: Tensor, Vh: Tensor, rank: int, clamp: float | None) -> LoraFactors:
    """The rank-``rank`` truncation of the SVD ``U S V^T`` as ``B' = U S``, ``A' = V^T`` (PEFT's split),
    optionally clamped; all of it where ``rank`` is larger."""
    rank = min(rank, S.shape[0])
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        high = _quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return LoraFactors(A.contiguous(), B.contiguous(), 1.0)


def _quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile's linear interpolation, without its limit on the input's size."""
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    below = int(position)
    above = min(below + 1, ordered.numel() - 1)
    return torch.lerp(ordered[below], ordered[above], position - below)


def _write(result: AdapterMerge, merged: dict[str, LoraFactors], first: AdapterFolder, base_name: str | None,
           fan_in_fan_out: bool, force: bool) -> None:
    config = copy.copy(first.config)
    config.base_model_name_or_path = base_name
    targets = sorted({name.rsplit(".", 1)[-1] for name in merged})
    peft_config, tensors = plain_lora(merged, config, targets, fan_in_fan_out)
    ours = peft_config.pop(EXTRA_KEY)
    ours.update(merged_by=result.method, merge_parameters=result.parameters, relative_errors=result.errors,
                merged_from=[{"path": str(spec.path), "weight": spec.weight, "method": name}
                             for spec, name in result.inputs])
    with atomic_output_dir(result.out_dir, force=force) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        (tmp / SETTINGS).write_text(json.dumps(ours, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(result, base_name))
        for child in tmp.iterdir():
            child.chmod(OUTPUT_FILE_MODE)


def model_card(result: AdapterMerge, base_name: str | None) -> str:
    """README.md: method, parameters, inputs, and each module's rank and relative error."""
    inputs = "\n".join(f"| {spec.path} | {spec.weight:g} | {method} |" for spec, method in result.inputs)
    settings = "\n".join(f"- {name}: {value}" for name, value in result.parameters.items())
    layers = "\n".join(f"| {module} | {result.ranks[module]} | {error:.6g} |"
                       for module, error in result.errors.items())
    seed = ("\n\nDARE's draws: one generator per module, seeded with blake2b(seed, module name) "
            "(`ftserve.merge.adapter_merge.module_seed`), drawing as PEFT draws within the module."
            if "seed" in result.parameters else "")
    header = "library_name: peft\n" + (f"base_model: {base_name}\n" if base_name else "")
    return (f"---\n{header}---\n\n# Merged adapter ({result.method})\n\n"
            f"Written by ftserve as PEFT's `add_weighted_adapter(combination_type=\"{result.method}\")` defines "
            f"the merge, as a plain LoRA of scale 1 (lora_alpha = r).\n\n## Parameters\n\n{settings}{seed}\n\n"
            f"## Inputs\n\n| adapter | weight | method |\n| --- | --- | --- |\n{inputs}\n\n"
            f"## Layers\n\nRelative error ||D - B'A'||_F / ||D||_F, D = {result.reference}.\n\n"
            f"| module | rank | relative error |\n| --- | --- | --- |\n{layers}\n")


def _rank_range(ranks: dict[str, int]) -> str:
    low, high = min(ranks.values()), max(ranks.values())
    return str(low) if low == high else f"{low} to {high}"
