"""Reading an adapter folder for an engine: confined to its root, checked against the base model's modules,
turned into its served form (methods/factors.py's LoraFactors: plain LoRA, or row-scaled with a magnitude).
Every engine reads adapters through ``read_checked``, so an adapter is refused with the same message whichever
engine serves it, and nothing unchecked reaches an engine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AdapterFileError
from ..files.adapter_folder import AdapterFolder, read_adapter
from ..files.confinement import confine_folder
from ..methods import LoraFactors
from .errors import AdapterLoadError, PathOutsideAdapterRootError


def read_checked(path: Path, shapes: dict[str, tuple[int, int]], max_rank: int, root: Path | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[AdapterFolder, dict[str, LoraFactors]]:
    """Read and check an adapter folder against the base model; its served form (LoraFactors) per module.

    Every method hands over the same form (VeRA slices its shared pair with each module's input size, taken from
    the base model), so one code path serves them all. Every size is checked against the base's shapes and
    ``max_rank`` before the factors are built, and the factors, a row-scaled form's magnitude included, must be
    finite in the serving ``dtype`` (LoraFactors.non_finite, LoraFactors.overflow, which bounds a row-scaled
    folded weight by its magnitude), so nothing that fails at its first request, or costs more memory than its
    rank allows, is loaded. A row-scaled form's scale ``r`` depends on the base weights, which are not read
    here: an engine that serves it computes and checks ``r`` (torch/adapter_cache.py). With ``root``, the folder
    is first checked to hold nothing that resolves outside it (PathOutsideAdapterRootError, 403).
    """
    if root is not None:
        try:
            confine_folder(path, root, error=PathOutsideAdapterRootError)
        except OSError as exc:
            raise AdapterLoadError(f"{path}: cannot check that every file in it lies inside the adapter root "
                                   f"({exc.strerror or exc}); make the folder and all it holds readable") from None
    try:
        folder = read_adapter(path)
    except AdapterFileError as exc:
        raise AdapterLoadError(str(exc)) from None
    missing = sorted(set(folder.modules) - set(shapes))
    if missing:
        raise AdapterLoadError(f"{path}: adapter for another base model: it targets {missing[:3]}"
                               f"{' ...' if len(missing) > 3 else ''}, which this base model lacks or cannot adapt")
    method = folder.config.adapter_method
    for name, state in folder.modules.items():
        d_out, d_in, _ = method.state_shape(state)
        if d_out != shapes[name][0] or d_in not in (None, shapes[name][1]):
            raise AdapterLoadError(f"{path}: adapter for another base model: {name} is {shapes[name][0]} x "
                                   f"{shapes[name][1]} here, the adapter's tensors are for {d_out} x {d_in or '?'}")
    try:
        in_features = {name: d_in for name, (_, d_in) in shapes.items()}
        folder.check_ranks(in_features, max_rank)
        exported = folder.lora_factors(in_features=in_features)
    except AdapterFileError as exc:
        raise AdapterLoadError(str(exc)) from None
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:
        raise AdapterLoadError(f"{path}: cannot export this {folder.config.method} adapter's factors ({exc}); "
                               f"is it for another base model?") from None
    for name, f in exported.items():
        d_out, d_in = shapes[name]
        if tuple(f.A.shape) != (f.rank, d_in) or tuple(f.B.shape) != (d_out, f.rank):
            raise AdapterLoadError(f"{path}: adapter for another base model: {name} is {d_out} x {d_in} here, the "
                                   f"adapter's factors are B {tuple(f.B.shape)} x A {tuple(f.A.shape)}")
        if f.row_scaled and tuple(f.magnitude.shape) != (d_out,):
            raise AdapterLoadError(f"{path}: adapter for another base model: {name} has {d_out} output rows here, the "
                                   f"adapter's magnitude vector is {tuple(f.magnitude.shape)}")
        if f.rank > max_rank:
            raise AdapterLoadError(f"{path}: rank {f.rank} on {name} exceeds the engine's max_lora_rank "
                                   f"{max_rank}; start the engine with max_lora_rank >= {f.rank}")
        problem = f.non_finite()
        if problem:
            raise AdapterLoadError(f"{path}: {name}: {problem}; the adapter is corrupt or its training diverged")
        problem = f.overflow(dtype)
        if problem:
            raise AdapterLoadError(f"{path}: {name}: {problem}, so every request on it would fail; lower its "
                                   f"lora_alpha (or the weights), or serve in a wider dtype")
    return folder, exported
