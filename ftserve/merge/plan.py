"""Merge, planning: a standalone checkpoint with one or more adapters folded into a base model, streaming.

Every adapter is first turned into its served form (``AdapterFolder.lora_factors``, the same factors export and
the engines use). Per output tensor, the adapters targeting it (merge weight ``w_k``, factors ``f_k``) are handed
to the merge's ``Combiner`` (combine.py; the weighted sum ``W' = W + sum_k w_k Delta_k`` by default), which
decides how that tensor is folded. A row-scaled adapter (DoRA's form) is merged only on its own, with any weight
(``alone_if_row_scaled``; combine.py defines the weighted one). GPT-2's ``Conv1D`` stores ``W`` transposed
``(d_in x d_out)``; the plan detects it and tells the combiner.

This module plans: it reads every input, checks everything (shapes, finiteness, dtypes) and decides each
output tensor and shard before a byte is written; ``write.py`` writes the plan.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import AdapterFileError, CheckpointError, ConfigError
from ..files.adapter_folder import AdapterFolder, read_adapter
from ..files.checkpoint import (FLOATS, INDEX, SINGLE, Checkpoint, TensorEntry, TensorReader, open_checkpoint,
                                parse_size, resolve_base)
from ..methods import LoraFactors, get_method
from .combine import ROW_SCALE_DOES_NOT_ADD, Combiner, Part, TensorFold, WeightedSum

if TYPE_CHECKING:
    from .methods import TensorInputs
    from .request import MergeRequest

COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".vocab")
NOT_COPIED = {INDEX, "pytorch_model.bin.index.json", "README.md", "adapter_config.json"}
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight")
BLOCK_BYTES = 2 * 2**20   # fp32 bytes per folded block: fits in L2/L3, amortises per-op overhead
WIDER = " or give dtype='float32'"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class AdapterSpec:
    """``DIR`` or ``DIR:WEIGHT`` on the command line. The weight must be finite: a NaN or inf weight would make
    every folded weight NaN or inf, and such a model loads without complaint."""

    path: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ConfigError(f"{self.path}: adapter weight {self.weight!r} is not a finite number; give a weight "
                              f"such as 1 or 0.5")

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """The text after the last colon is the weight, unless the whole text names an existing path (a folder
        whose name holds a colon)."""
        head, sep, tail = text.rpartition(":")
        if not (sep and head) or Path(text).exists():
            return cls(Path(text))
        try:
            weight = float(tail)
        except ValueError:
            raise ConfigError(f"adapter weight {tail!r} in {text!r} is not a number, and there is no adapter "
                              f"folder {text!r}; write DIR or DIR:WEIGHT, e.g. {head}:0.5") from None
        return cls(Path(head), weight)


@dataclass
class OutputTensor:
    name: str
    source: TensorEntry
    dtype: torch.dtype
    fold: TensorFold | None = None
    inputs: TensorInputs | None = None  # a model merge's (inputs.py): what verify recomputes the tensor from

    @property
    def nbytes(self) -> int:
        return self.source.numel * self.dtype.itemsize

    @property
    def is_copy(self) -> bool:
        return self.fold is None and self.dtype == self.source.dtype and self.source.offset is not None


@dataclass
class MergePlan:
    """Everything a merge will do, decided and checked before anything is written."""

    base: str
    checkpoint: Checkpoint
    adapters: list[tuple[AdapterSpec, AdapterFolder]]
    tensors: list[OutputTensor]
    shards: list[list[OutputTensor]]
    config: dict
    dtype_name: str
    warnings: list[str] = field(default_factory=list)
    modules: dict[str, list[str]] = field(default_factory=dict)  # output key -> the adapters' module names for it
    request: MergeRequest | None = None  # a model merge's (inputs.py)
    inputs: list[Path] = field(default_factory=list)  # every folder read: the output must not overlap one
    readers: list[TensorReader] = field(default_factory=list)  # other models' checkpoints, opened by write.py

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_merge(base: str | os.PathLike, adapters: list[AdapterSpec], dtype: str | None = None,
               max_shard_size: str | int = "5GB", allow_pickle: bool = False,
               combiner: Combiner | None = None) -> MergePlan:
    """Resolve the base, read every adapter, check that each fits (module present, shapes agree, factors
    finite), have ``combiner`` (default: the weighted sum) decide each targeted tensor's fold and lay out the
    output shards. Raises AdapterFileError / CheckpointError naming the module (and both shapes, for a
    mismatch)."""
    if not adapters:
        raise AdapterFileError("give at least one adapter to merge")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    limit = parse_size(max_shard_size)
    base_path = resolve_base(base)
    checkpoint = open_checkpoint(base_path, allow_pickle)
    config = checkpoint.config()
    tied = bool(config.get("tie_word_embeddings", False))
    notes: list[str] = []
    folders = []
    for spec in adapters:
        folder = read_adapter(spec.path, allow_pickle=allow_pickle)
        recorded = folder.config.base_model_name_or_path
        if recorded and Path(str(recorded)).name != Path(str(base)).name and str(recorded) != str(base):
            notes.append(f"{spec.path}: adapter records base {recorded!r}, merging into {str(base)!r}; "
                         f"the shapes agree, so going ahead")
        folders.append((spec, folder))
    alone_if_row_scaled(folders)
    out_dtype = DTYPES[dtype] if dtype else None
    parts, transposed, extra, modules = plan_parts(checkpoint, folders, tied, out_dtype)
    combiner = combiner or WeightedSum()
    folds = {key: combiner.fold(key_parts, transposed[key]) for key, key_parts in parts.items()}
    tensors = []
    for key, entry in list(checkpoint.tensors.items()) + list(extra.items()):
        target = out_dtype if out_dtype is not None and entry.dtype in FLOATS else entry.dtype
        tensors.append(OutputTensor(key, entry, target, folds.get(key)))
    if tied and any(_is_output_embedding(t.name) for t in tensors if t.fold is not None):
        config = {**config, "tie_word_embeddings": False}
        notes.append("the output embedding changed, so the merged config unties it from the input embedding")
    if dtype:
        config = {**config, "dtype": dtype, **({"torch_dtype": dtype} if "torch_dtype" in config else {})}
    dtype_name = dtype or str(config.get("dtype") or config.get("torch_dtype") or main_dtype(tensors))
    return MergePlan(str(base), checkpoint, folders, tensors, shard_tensors(tensors, limit), config, dtype_name,
                     notes, modules, inputs=[checkpoint.path] + [folder.path for _, folder in folders])


def alone_if_row_scaled(folders: list[tuple[AdapterSpec, AdapterFolder]]) -> None:
    """Refuse a recipe that holds a row-scaled adapter (DoRA) beside any other adapter (ConfigError naming it and
    why: ``ROW_SCALE_DOES_NOT_ADD``). Alone, it merges with any weight (combine.py)."""
    scaled = [(spec, folder) for spec, folder in folders if folder.config.adapter_method.row_scaled]
    if scaled and len(folders) > 1:
        spec, folder = scaled[0]
        title = folder.config.adapter_method.title
        raise ConfigError(f"{spec.path}: a {title} adapter merges only on its own, not with {len(folders) - 1} "
                          f"other adapter(s): {ROW_SCALE_DOES_NOT_ADD}. Merge it alone, then merge the others into "
                          f"its output")


def plan_parts(checkpoint: Checkpoint, folders: list[tuple[AdapterSpec, AdapterFolder]], tied: bool,
               out_dtype: torch.dtype | None
               ) -> tuple[dict[str, list[Part]], dict[str, bool], dict[str, TensorEntry], dict[str, list[str]]]:
    """Per output key, every adapter targeting it (checked) and whether the key is stored transposed; output
    keys not stored in the base (a tied output embedding), with the stored tensor they start from; and per
    output key, the module names the adapters gave it."""
    per_key: dict[str, list[Part]] = {}
    modules: dict[str, list[str]] = {}
    transposed: dict[str, bool] = {}
    extra: dict[str, TensorEntry] = {}
    for spec, folder in folders:
        method = get_method(folder.config.method)
        fan_in_fan_out = bool(folder.raw_config.get("fan_in_fan_out", False))
        sizes, keys = {}, {}
        for module, state in folder.modules.items():
            key, entry = _find_weight(checkpoint, module, tied, folder)
            if key not in checkpoint.tensors:
                extra[key] = entry
            d_out, d_in, _ = method.state_shape(state)
            shape = entry.shape
            if len(shape) != 2 or d_out not in shape:
                d_in = d_in or "d_in"
                raise AdapterFileError(f"{folder.path}: module {module} does not fit the base: the adapter needs a "
                                       f"weight of shape ({d_out}, {d_in}), the base has {entry.name} with shape "
                                       f"{tuple(shape)}")
            is_t = shape[1] == d_out and (shape[0] != d_out or fan_in_fan_out)
            sizes[module], keys[module] = (shape[0] if is_t else shape[1]), (key, entry, is_t)
        factors = folder.lora_factors(sizes)
        for module, f in factors.items():
            key, entry, is_t = keys[module]
            _check_finite(folder, module, f, spec.weight, out_dtype or entry.dtype)
            need = (f.B.shape[0], f.A.shape[1])
            have = tuple(entry.shape[::-1]) if is_t else tuple(entry.shape)
            if need != have:
                raise AdapterFileError(f"{folder.path}: module {module} does not fit the base: the adapter needs a "
                                       f"weight of shape {need}{' (stored transposed)' if is_t else ''}, the base "
                                       f"has {key} with shape {tuple(entry.shape)}")
            if entry.dtype not in FLOATS:
                raise CheckpointError(f"{checkpoint.path}: {key} is stored as {entry.dtype}; folding into quantized "
                                      f"or integer weights is not supported")
            if transposed.setdefault(key, is_t) != is_t:
                raise AdapterFileError(f"{folder.path}: module {module}: adapters disagree on whether {key} is "
                                       f"stored transposed (fan_in_fan_out)")
            per_key.setdefault(key, []).append(Part.of(spec.weight, f))
            modules.setdefault(key, []).append(module)
    return per_key, transposed, extra, modules


def _check_finite(folder: AdapterFolder, module: str, factors: LoraFactors, weight: float,
                  dtype: torch.dtype) -> None:
    """A NaN or inf in an adapter (a diverged training run, a damaged file) spreads to every row of the weight
    it is folded into, and the merged model still loads; refuse it before anything is written. So is a delta
    that overflows, as the fold scales it (in fp32) or in the dtype it is written in (LoraFactors.overflow).

    A row-scaled form rescales each row of ``W + s B A`` (formed in fp32) to its magnitude, so only that fp32
    sum is bounded here; what reaches the written dtype depends on W, and write.py checks every block of it."""
    problem = factors.non_finite()
    if problem:
        raise AdapterFileError(f"{folder.path}: module {module}: {problem}; the adapter is corrupt or its training "
                               f"diverged, so retrain it or use an earlier checkpoint")
    if dtype not in FLOATS:
        return  # refused by the caller: not a weight we fold into
    weighted = factors if factors.row_scaled else dataclasses.replace(factors, scale=factors.scale * weight)
    for width in dict.fromkeys((torch.float32,) if factors.row_scaled else (torch.float32, dtype)):
        problem = weighted.overflow(width)
        if problem:
            why = (f"weight {weight:g} x the adapter's scale {factors.scale:g}"
                   if weight != 1 and not factors.row_scaled else "its scale")
            raise ConfigError(f"{folder.path}: module {module}: {problem}; the merged weights would hold inf. "
                              f"Lower {why}{WIDER if width != torch.float32 else ''}")


def _find_weight(checkpoint: Checkpoint, module: str, tied: bool,
                 folder: AdapterFolder) -> tuple[str, TensorEntry]:
    """(output key, stored tensor) of ``module``'s weight: its own key, the key without the model prefix
    (``transformer.``), or, for an output embedding tied to the input embedding and not stored, the input
    embedding, written out under the output embedding's key."""
    names = [f"{module}.weight"]
    if "." in module:
        names.append(f"{module.split('.', 1)[1]}.weight")
    for name in names:
        if name in checkpoint.tensors:
            return name, checkpoint.tensors[name]
    if tied and _is_output_embedding(names[0]):
        source = next((e for n, e in checkpoint.tensors.items() if n.endswith(INPUT_EMBEDDINGS)), None)
        if source is not None:
            return names[0], source
    raise AdapterFileError(f"{folder.path}: module {module} is not in the base checkpoint {checkpoint.path} "
                           f"(no tensor {names[0]}); is this adapter for another model?")


def _is_output_embedding(key: str) -> bool:
    return key.removesuffix(".weight").rsplit(".", 1)[-1] in OUTPUT_EMBEDDINGS


def main_dtype(tensors: list[OutputTensor]) -> str:
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else "float32"


def shard_tensors(tensors: list[OutputTensor], limit: int) -> list[list[OutputTensor]]:
    """Greedy in stored order, as transformers does; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards
