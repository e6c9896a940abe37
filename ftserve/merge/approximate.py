"""Export, approximately: the best rank-R plain LoRA of an adapter's merged delta, for servers that take LoRA only.

A row-scaled adapter (DoRA, arXiv:2402.09353) has no exact plain-LoRA form: its delta on a base weight ``W``::

    Delta = diag(r) (W + s B A) - W,      r = m / ||W + s B A||_row

is of full rank in general (the row scale multiplies ``W`` itself), so ``export_adapter`` refuses it. Asked for a
rank ``R``, this module writes the best rank-``R`` approximation of each targeted weight's ``Delta`` instead
(Eckart-Young: the truncated SVD, best in the Frobenius and the spectral norm)::

    Delta = U S V^T,      B' = U_R sqrt(S_R),      A' = sqrt(S_R) V_R^T,      scale 1 (r = lora_alpha = R)

``S`` is split evenly between the factors, so that neither is much larger than the other where a server casts
them to 16 bits. ``Delta`` is what the merge folds (plan.py and combine.py, the same fold in fp32 over the whole
tensor), read from the base checkpoint one tensor at a time; the SVD is in fp32. The relative error of each
layer, ``||Delta - B' A'||_F / ||Delta||_F`` (computed, not inferred from ``S``; ``0`` for a zero delta), is
returned and recorded in the folder's ``ftserve_config.json``; ``R = min(d_out, d_in)`` is exact up to fp32
rounding. Any adapter can be approximated this way; a plain one of rank above ``R`` gets a smaller rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import EXTRA_KEY
from ..errors import ConfigError
from ..files.adapter_folder import ADAPTER_WEIGHTS, AdapterFolder, plain_lora, write_adapter_folder
from ..files.checkpoint import TensorReader
from ..methods import LoraFactors
from .combine import fold_tensor
from .plan import AdapterSpec, OutputTensor, plan_merge


@dataclass
class ApproximateExport:
    """What ``export_approximate`` wrote: the source folder, the rank, each module's relative error."""

    folder: AdapterFolder
    rank: int
    errors: dict[str, float]  # module -> ||Delta - B' A'||_F / ||Delta||_F


def export_approximate(src: str | os.PathLike, dst: str | os.PathLike, base: str | os.PathLike, rank: int,
                       force: bool = False, allow_pickle: bool = False) -> ApproximateExport:
    """Write the best rank-``rank`` plain PEFT LoRA of the adapter at ``src`` merged into ``base`` (see the module
    docstring). ConfigError, before anything is computed or written, for a rank below 1 or above a targeted
    layer's ``min(d_out, d_in)``; the merge plan's errors for an adapter that does not fit ``base``."""
    plan = plan_merge(base, [AdapterSpec(Path(src))], allow_pickle=allow_pickle)
    ((_, folder),) = plan.adapters
    folded = [t for t in plan.tensors if t.fold is not None]
    _check_rank(rank, folded, plan.modules)
    factors, errors = {}, {}
    with TensorReader(plan.checkpoint) as reader:
        for t in folded:
            stored = reader.read_rows(t.source, 0, t.source.rows)
            delta = fold_tensor(t.fold, stored).sub_(stored.float())
            (module,) = plan.modules[t.name]
            factors[module], errors[module] = best_rank(delta.T if t.fold.transposed else delta, rank)
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    fan_in_fan_out = bool(folder.raw_config.get("fan_in_fan_out", False))
    peft_config, tensors = plain_lora(factors, folder.config, targets, fan_in_fan_out)
    peft_config[EXTRA_KEY].update(exported_from=folder.config.method, approximate_rank=rank, relative_errors=errors)
    write_adapter_folder(dst, peft_config, {ADAPTER_WEIGHTS: tensors}, force=force, replace_whole=True)
    return ApproximateExport(folder, rank, errors)


def best_rank(delta: Tensor, rank: int) -> tuple[LoraFactors, float]:
    """The truncated SVD of ``delta`` (d_out, d_in) as plain factors of scale 1, and its relative error."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = S[:rank].sqrt()
    factors = LoraFactors(Vh[:rank] * root[:, None], U[:, :rank] * root, 1.0)
    norm = torch.linalg.matrix_norm(delta)
    residual = torch.linalg.matrix_norm(torch.addmm(delta, factors.B, factors.A, alpha=-1))
    return factors, float(residual / norm) if norm > 0 else 0.0


def _check_rank(rank: int, folded: list[OutputTensor], modules: dict[str, list[str]]) -> None:
    smallest = min(folded, key=lambda t: min(t.source.shape))
    bound = min(smallest.source.shape)
    if rank < 1 or rank > bound:
        (module,) = modules[smallest.name]
        raise ConfigError(f"approximate_rank={rank} is not a rank these layers have: give 1 to {bound}, the "
                          f"smallest min(d_out, d_in) of the targeted layers (module {module}, "
                          f"{' x '.join(map(str, smallest.source.shape))})")
