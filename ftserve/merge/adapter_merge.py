"""Merge, to an adapter: several adapters become one new plain LoRA, without a base model or a merged checkpoint.

The semantics are PEFT's ``LoraModel.add_weighted_adapter`` (0.22), module by module, over each adapter's
served form ``(A_k, B_k, s_k)`` (``AdapterFolder.lora_factors``: LoRA, LoRA-FA, LoRA+, VeRA and Delta-LoRA all
have exact plain factors) with merge weights ``w_k``. Only the adapters that target a module take part in it.

This module reads the adapters, checks the request and the inputs, and writes the folder and its card; the
math of each method, module by module, is ``adapter_combine``'s (cat, linear, svd, ties, dare, magnitude_prune).

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
import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from ..config import EXTRA_KEY
from ..errors import AdapterFileError, ConfigError
from ..files.adapter_folder import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SETTINGS, AdapterFolder, plain_lora,
                                    read_adapter, row_scaled_reason)
from ..files.atomic import OUTPUT_FILE_MODE, atomic_output_dir
from ..files.checkpoint import Checkpoint, module_in_features, open_checkpoint, resolve_base
from ..methods import LoraFactors
from .adapter_combine import (DENSE_METHODS, FACTOR_METHODS, METHODS, SIGN_METHODS, Combination, keep_largest,
                              merge_module, module_seed, relative_error)
from .plan import AdapterSpec

__all__ = ["DENSE_METHODS", "FACTOR_METHODS", "METHODS", "SIGN_METHODS", "AdapterMerge", "Combination",
           "keep_largest", "merge_to_adapter", "model_card", "module_seed", "relative_error", "run_adapter_merge"]


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
    svd_clamp=clamp, density=density, majority_sign_method=...)`` makes of ``adapters`` (see ``adapter_combine``'s
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
    merged, errors = {}, {}
    for module, parts in per_module.items():
        target, merged[module] = merge_module(method, module, parts, rank=rank, density=density,
                                              sign_method=majority_sign_method, clamp=clamp, seed=seed,
                                              fan_in_fan_out=fan_in_fan_out)
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
