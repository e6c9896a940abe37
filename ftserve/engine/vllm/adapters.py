"""Adapters as vLLM reads them: checked, exported to plain LoRA, cached by content, ranked.

vLLM reads only PEFT's LoRA (a VeRA folder without ``lora_alpha`` takes its engine down) and ignores the
settings ftserve keeps under its own key. So every adapter goes through the same checks as on the torch engine
(``read_checked``: confined to its root, for this base model's modules, finite, within the rank limit) and
is handed to vLLM as its exact plain-LoRA export (``ftserve export``'s factors), written once into a cache
folder named by a hash of the adapter's files and of the base's module sizes (VeRA's export depends on
them). vLLM reads only that copy, when it loads the adapter and again whenever it evicted it: a folder that
changed after it was checked, or a symlink put in it later, never reaches vLLM.

vLLM sizes its LoRA buffers by ``max_lora_rank`` and accepts only the ranks of VLLM_RANKS; without
``--max-lora-rank`` it is derived from the adapters given at startup (``derived_max_lora_rank``).

A row-scaled adapter (DoRA's form, ``LoraFactors.magnitude``) has no plain-LoRA export, and vLLM's LoRA adds a
low-rank term without scaling the base output, so it is refused by name (``check_servable``), at startup and
at runtime alike, naming the torch engine, which serves it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...config import EXTRA_KEY, FineTuningConfig
from ...files.adapter_folder import ADAPTER_WEIGHTS, AdapterFolder, plain_lora, write_adapter_folder
from ...methods import LoraFactors
from ...methods.base import TARGETABLE, linear_shape
from ..adapter_files import read_checked
from ..errors import AdapterLoadError
from ..frontend import resolve_adapter_path
from ..options import EngineOptionsError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py's MaxLoRARanks
VLLM_DEFAULT_RANK = 16  # vLLM's own default, the least when no adapter is given at startup
EXPORT_FORMAT = "1"  # part of the cache key: a change to what is written makes new folders


def round_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for accepted in VLLM_RANKS:
        if rank <= accepted:
            return accepted
    raise EngineOptionsError("max_lora_rank", f"would have to be {rank}; vLLM accepts at most {VLLM_RANKS[-1]}")


def check_rank(rank: int) -> int:
    """A given max_lora_rank, refused unless vLLM accepts it."""
    if rank not in VLLM_RANKS:
        raise EngineOptionsError("max_lora_rank", f"must be one vLLM accepts ({', '.join(map(str, VLLM_RANKS))}) "
                                                  f"on the vllm engine; got {rank}. Use {round_rank(rank)}")
    return rank


def base_shapes(base: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module an adapter may target in the base model, by name, as the torch engine
    sees them: every linear layer but the output embedding, read off the model built on the meta device
    (from config.json alone, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return {name: linear_shape(module) for name, module in model.named_modules()
            if isinstance(module, TARGETABLE) and module is not head}


@dataclass
class VllmAdapter:
    """A checked adapter: its folder as read, its plain-LoRA export for vLLM, and the export's rank."""

    folder: AdapterFolder
    export: Path
    rank: int


def cache_root() -> Path:
    """Where exports are kept: $FTSERVE_VLLM_ADAPTER_CACHE, else $XDG_CACHE_HOME/ftserve/vllm-adapters."""
    if os.environ.get("FTSERVE_VLLM_ADAPTER_CACHE"):
        return Path(os.environ["FTSERVE_VLLM_ADAPTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftserve" / "vllm-adapters"


def content_key(path: Path, shapes: dict[str, tuple[int, int]]) -> str:
    """sha256 of every file of the folder (names and bytes) and of the base's module sizes."""
    digest = hashlib.sha256(f"ftserve-vllm-export {EXPORT_FORMAT}\n".encode())
    digest.update(json.dumps(sorted(shapes.items())).encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"\n{file.relative_to(path).as_posix()}\n".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def prepare(path: Path, shapes: dict[str, tuple[int, int]], max_rank: int, root: Path | None = None,
            cache: Path | None = None, dtype: str = "float32") -> VllmAdapter:
    """Check the adapter at ``path`` (for vLLM's serving ``dtype``, a name such as ``"bfloat16"``) and write its
    plain-LoRA export for vLLM, once per content.

    The hash is taken before the folder is read, and the export is written from the factors that were checked,
    never from a second read: the cached folder holds checked content under whatever key it has.
    """
    try:
        key = content_key(path, shapes) if path.is_dir() else None
    except OSError as exc:
        raise AdapterLoadError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    import torch

    folder, factors = read_checked(path, shapes, max_rank, root, getattr(torch, dtype))
    check_servable(path, folder, factors)
    rank = max(f.rank for f in factors.values())
    export = (cache or cache_root()) / key
    if not (export / ADAPTER_WEIGHTS).is_file():
        targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
        peft_config, tensors = plain_lora(factors, folder.config, targets,
                                          bool(folder.raw_config.get("fan_in_fan_out", False)))
        peft_config[EXTRA_KEY]["exported_from"] = folder.config.method
        _write(export, peft_config, tensors, f"the plain-LoRA export of {path}")
    return VllmAdapter(folder, export, rank)


def check_servable(path: Path, folder: AdapterFolder, factors: dict[str, LoraFactors]) -> None:
    """Refuse a row-scaled adapter (AdapterLoadError): vLLM's LoRA cannot scale the base output per row."""
    if folder.config.adapter_method.row_scaled or any(f.row_scaled for f in factors.values()):
        raise AdapterLoadError(f"adapter {path} (method {folder.config.method}) scales each output row by its base "
                               f"weight's norm, which vLLM's LoRA cannot serve; serve it with --engine torch, or "
                               f"merge it into the base model (`ftserve merge`)")


def _write(export: Path, peft_config: dict, tensors: dict, what: str) -> None:
    try:
        export.parent.mkdir(parents=True, exist_ok=True)
        write_adapter_folder(export, peft_config, {ADAPTER_WEIGHTS: tensors}, force=True, replace_whole=True)
    except OSError as exc:
        raise AdapterLoadError(f"cannot write {what} for vLLM into {export.parent} ({exc.strerror or exc}); set "
                               f"FTSERVE_VLLM_ADAPTER_CACHE to a writable folder") from None


def zero_adapter(shapes: dict[str, tuple[int, int]], cache: Path | None = None) -> Path:
    """A rank-1 LoRA whose update is exactly zero, for the base model's requests on vLLM's CPU backend.

    vLLM's CPU LoRA kernels (vllm/lora/ops/torch_ops) gather each row's adapter slot with the row's
    index, and a row without an adapter has index -1, which Python reads as the last slot: once that slot
    holds an adapter, base-model rows batched with adapter rows get its update. Sending the base model's
    requests with this adapter gives every row a real slot.
    """
    import torch

    name = min(shapes)
    d_out, d_in = shapes[name]
    factors = {name: LoraFactors(A=torch.zeros(1, d_in), B=torch.zeros(d_out, 1), scale=1.0)}
    export = (cache or cache_root()) / f"zero-{EXPORT_FORMAT}-{name}-{d_out}x{d_in}"
    if not (export / ADAPTER_WEIGHTS).is_file():
        peft_config, tensors = plain_lora(factors, FineTuningConfig(method="lora", lora_r=1, lora_alpha=1),
                                          [name.rsplit(".", 1)[-1]], False)
        _write(export, peft_config, tensors, "the zero adapter")
    return export


def startup_rank(base: str | os.PathLike, adapters: dict[str, str], max_rank: int = VLLM_RANKS[-1]) -> int | None:
    """The largest exported rank (Delta-LoRA's is 2r) of ``adapters`` (name -> folder or Hub id) given at startup,
    None if there are none; each is read and checked as at runtime (AdapterLoadError: a row-scaled adapter, a
    rank above ``max_rank``, ...), so a bad one is refused in one line before vLLM starts."""
    if not adapters:
        return None
    shapes = base_shapes(base)
    ranks = []
    for path in adapters.values():
        resolved = resolve_adapter_path(path)
        folder, factors = read_checked(resolved, shapes, max_rank)
        check_servable(resolved, folder, factors)
        ranks.append(max(f.rank for f in factors.values()))
    return max(ranks)


def derived_max_lora_rank(base: str | os.PathLike, adapters: dict[str, str]) -> int:
    """``--max-lora-rank`` for ``adapters`` given at startup (``startup_rank``): their largest exported rank
    rounded up to a rank vLLM accepts, and at least vLLM's default, 16, so that adapters loaded at runtime have
    room."""
    rank = startup_rank(base, adapters)
    return VLLM_DEFAULT_RANK if rank is None else max(VLLM_DEFAULT_RANK, round_rank(rank))
