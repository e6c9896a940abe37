"""Merge, planning: a standalone checkpoint with one or more adapters folded into a base model, streaming.

Every adapter is first turned into its exact plain-LoRA factors (``AdapterFolder.lora_factors``, the same
factors export and the engines use). For a base weight ``W (d_out x d_in)`` targeted by adapters ``k`` with
merge weights ``w_k``::

    one adapter:     W' = round(W + (B @ A) * (w s))                  fp32 inside, rounded once
    several:         W' = round(W + B_cat @ A_cat)                    B_cat = [w_1 s_1 B_1, ...], A_cat = [A_1; ...]

``B_cat @ A_cat = sum_k w_k s_k B_k A_k``: a weighted sum of LoRAs is one LoRA of rank ``sum r_k``. GPT-2's
``Conv1D`` stores ``W`` transposed ``(d_in x d_out)`` and gets ``((B @ A) * s)^T``. The single-adapter order of
operations is PEFT's (``W += transpose(B @ A) * s`` with fp32 factors, which computes in fp32 and rounds once).

This module plans: it reads every input, checks everything (shapes, finiteness, dtypes) and decides each
output tensor and shard before a byte is written; ``write.py`` writes the plan.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import AdapterFileError, CheckpointError, ConfigError
from ..files.adapter_folder import AdapterFolder, read_adapter
from ..files.checkpoint import FLOATS, INDEX, SINGLE, Checkpoint, TensorEntry, open_checkpoint, parse_size, resolve_base
from ..methods import LoraFactors, get_method

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
class Fold:
    """``W' = round(W + (B @ A) * scale)``, transposed for Conv1D; fp32 factors.

    When ``scale`` is a power of two, ``(B @ A) * scale = (scale B) @ A`` exactly (scaling by 2^k commutes
    with rounding), so B is scaled once and the product accumulated onto W in one GEMM (``addmm_``: the
    product is rounded, then added; benchmarks/merge.py checks the result bit for bit against PEFT).
    """

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scale: float
    transposed: bool

    def __post_init__(self) -> None:
        if self.scale != 1.0 and math.frexp(self.scale)[0] == 0.5:
            self.B, self.scale = self.B * self.scale, 1.0

    def block(self, weight: Tensor, delta: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the folded weight, in fp32, from the same rows of the stored weight
        (``weight``, already fp32, updated in place); ``delta`` is scratch of the delta block's shape."""
        if not self.transposed and self.scale == 1.0:
            return weight.addmm_(self.B[start:stop], self.A)
        if self.transposed:
            torch.mm(self.B, self.A[:, start:stop], out=delta)
        else:
            torch.mm(self.B[start:stop], self.A, out=delta)
        if self.scale != 1.0:
            delta.mul_(self.scale)
        return weight.add_(delta.t() if self.transposed else delta)


@dataclass
class OutputTensor:
    name: str
    source: TensorEntry
    dtype: torch.dtype
    fold: Fold | None = None

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

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shard_names(self) -> list[str]:
        n = len(self.shards)
        return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_merge(base: str | os.PathLike, adapters: list[AdapterSpec], dtype: str | None = None,
               max_shard_size: str | int = "5GB", allow_pickle: bool = False) -> MergePlan:
    """Resolve the base, read every adapter, check that each fits (module present, shapes agree, factors
    finite) and lay out the output shards. Raises AdapterFileError / CheckpointError naming the module (and both
    shapes, for a mismatch)."""
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
    out_dtype = DTYPES[dtype] if dtype else None
    folds, extra = _plan_folds(checkpoint, folders, tied, out_dtype)
    tensors = []
    for key, entry in list(checkpoint.tensors.items()) + list(extra.items()):
        target = out_dtype if out_dtype is not None and entry.dtype in FLOATS else entry.dtype
        tensors.append(OutputTensor(key, entry, target, folds.get(key)))
    if tied and any(_is_output_embedding(t.name) for t in tensors if t.fold is not None):
        config = {**config, "tie_word_embeddings": False}
        notes.append("the output embedding changed, so the merged config unties it from the input embedding")
    if dtype:
        config = {**config, "dtype": dtype, **({"torch_dtype": dtype} if "torch_dtype" in config else {})}
    dtype_name = dtype or str(config.get("dtype") or config.get("torch_dtype") or _main_dtype(tensors))
    return MergePlan(str(base), checkpoint, folders, tensors, _shard(tensors, limit), config, dtype_name, notes)


def _plan_folds(checkpoint: Checkpoint, folders: list[tuple[AdapterSpec, AdapterFolder]], tied: bool,
                out_dtype: torch.dtype | None) -> tuple[dict[str, Fold], dict[str, TensorEntry]]:
    """Per output key, the fold of every adapter targeting it; and output keys not stored in the base (a tied
    output embedding), with the stored tensor they start from."""
    per_key: dict[str, list[tuple[float, Tensor, Tensor, float]]] = {}
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
            per_key.setdefault(key, []).append((spec.weight, f.A.float(), f.B.float(), f.scale))
    folds = {}
    for key, parts in per_key.items():
        if len(parts) == 1:
            weight, A, B, scale = parts[0]
            folds[key] = Fold(A, B, scale * weight, transposed[key])
        else:
            A = torch.cat([p[1] for p in parts], dim=0)
            B = torch.cat([p[2] * (p[0] * p[3]) for p in parts], dim=1)
            folds[key] = Fold(A, B, 1.0, transposed[key])
    return folds, extra


def _check_finite(folder: AdapterFolder, module: str, factors: LoraFactors, weight: float,
                  dtype: torch.dtype) -> None:
    """A NaN or inf in an adapter (a diverged training run, a damaged file) spreads to every row of the weight
    it is folded into, and the merged model still loads; refuse it before anything is written. So is a delta
    that overflows, as the fold scales it (in fp32) or in the dtype it is written in (LoraFactors.overflow)."""
    problem = factors.non_finite()
    if problem:
        raise AdapterFileError(f"{folder.path}: module {module}: {problem}; the adapter is corrupt or its training "
                               f"diverged, so retrain it or use an earlier checkpoint")
    if dtype not in FLOATS:
        return  # refused by the caller: not a weight we fold into
    for width in dict.fromkeys((torch.float32, dtype)):
        problem = LoraFactors(factors.A, factors.B, factors.scale * weight).overflow(width)
        if problem:
            why = f"weight {weight:g} x the adapter's scale {factors.scale:g}" if weight != 1 else "its scale"
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


def _main_dtype(tensors: list[OutputTensor]) -> str:
    sizes: dict[torch.dtype, int] = {}
    for t in tensors:
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else "float32"


def _shard(tensors: list[OutputTensor], limit: int) -> list[list[OutputTensor]]:
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
