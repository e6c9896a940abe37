"""Merge: write a standalone checkpoint with one or more adapters folded into a base model, streaming.

Every adapter is first turned into its exact plain-LoRA factors (``AdapterFolder.lora_factors``, the same
factors export and the engines use). For a base weight ``W (d_out x d_in)`` targeted by adapters ``k`` with
merge weights ``w_k``::

    one adapter:     W' = round(W + (B @ A) * (w s))                  fp32 inside, rounded once
    several:         W' = round(W + B_cat @ A_cat)                    B_cat = [w_1 s_1 B_1, ...], A_cat = [A_1; ...]

``B_cat @ A_cat = sum_k w_k s_k B_k A_k``: a weighted sum of LoRAs is one LoRA of rank ``sum r_k``. GPT-2's
``Conv1D`` stores ``W`` transposed ``(d_in x d_out)`` and gets ``((B @ A) * s)^T``. The single-adapter order of
operations is PEFT's (``W += transpose(B @ A) * s`` with fp32 factors, which computes in fp32 and rounds once).

Memory stays bounded whatever the model size: tensors are read, folded and written in blocks of whole rows
(``W'[i:j]`` needs only ``W[i:j]`` and ``B[i:j]``, or ``A[:, i:j]`` when transposed), untouched tensors are
copied file to file inside the kernel, and output files are written header first then byte by byte. Worker
threads (one per core, one intra-op thread each) fold blocks while the main thread writes them in order. The
output folder appears whole at the end (temporary folder beside it, then a rename) or not at all.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .adapter_io import AdapterFolder, atomic_output_dir, read_adapter
from .checkpoint import (FLOATS, INDEX, SINGLE, Checkpoint, TensorEntry, TensorReader, copy_range,
                         open_checkpoint, parse_size, resolve_base, safetensors_header)
from .errors import AdapterFileError, CheckpointError, ConfigError
from .methods import LoraFactors

COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".vocab")
NOT_COPIED = {INDEX, "pytorch_model.bin.index.json", "README.md", "adapter_config.json"}
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight")
BLOCK_BYTES = 2 * 2**20   # fp32 bytes per folded block: fits in L2/L3, amortises per-op overhead
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
        raise CheckpointError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
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
    folds, extra = _plan_folds(checkpoint, folders, tied)
    out_dtype = DTYPES[dtype] if dtype else None
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


def _plan_folds(checkpoint: Checkpoint, folders: list[tuple[AdapterSpec, AdapterFolder]],
                tied: bool) -> tuple[dict[str, Fold], dict[str, TensorEntry]]:
    """Per output key, the fold of every adapter targeting it; and output keys not stored in the base (a tied
    output embedding), with the stored tensor they start from."""
    per_key: dict[str, list[tuple[float, Tensor, Tensor, float]]] = {}
    transposed: dict[str, bool] = {}
    extra: dict[str, TensorEntry] = {}
    for spec, folder in folders:
        fan_in_fan_out = bool(folder.raw_config.get("fan_in_fan_out", False))
        sizes, keys = {}, {}
        for module, state in folder.modules.items():
            key, entry = _find_weight(checkpoint, module, tied, folder)
            if key not in checkpoint.tensors:
                extra[key] = entry
            d_out = (state.get("lora_B.weight", state.get("vera_lambda_b"))).shape[0]
            shape = entry.shape
            if len(shape) != 2 or d_out not in shape:
                d_in = state["lora_A.weight"].shape[1] if "lora_A.weight" in state else "d_in"
                raise AdapterFileError(f"{folder.path}: module {module} does not fit the base: the adapter needs a "
                                       f"weight of shape ({d_out}, {d_in}), the base has {entry.name} with shape "
                                       f"{tuple(shape)}")
            is_t = shape[1] == d_out and (shape[0] != d_out or fan_in_fan_out)
            sizes[module], keys[module] = (shape[0] if is_t else shape[1]), (key, entry, is_t)
        factors = folder.lora_factors(sizes)
        for module, f in factors.items():
            _check_finite(folder, module, f, spec.weight)
            key, entry, is_t = keys[module]
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


def _check_finite(folder: AdapterFolder, module: str, factors: LoraFactors, weight: float) -> None:
    """A NaN or inf in an adapter (a diverged training run, a damaged file) spreads to every row of the weight
    it is folded into, and the merged model still loads; refuse it before anything is written. B is checked
    as the fold scales it too, in fp32, where a huge weight overflows."""
    for name, value in (("A", factors.A), ("B", factors.B)):
        bad = int(value.numel() - torch.isfinite(value).sum())
        if bad:
            raise AdapterFileError(f"{folder.path}: module {module}: its LoRA factor {name} holds {bad} NaN or inf "
                                   f"value(s) of {value.numel()}; the adapter is corrupt or its training diverged, "
                                   f"so retrain it or use an earlier checkpoint")
    if not torch.isfinite(factors.B.float() * (factors.scale * weight)).all():
        raise ConfigError(f"{folder.path}: module {module}: weight {weight:g} times the scale {factors.scale:g} "
                          f"overflows float32 in its LoRA factor B; give a smaller weight")


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


# Writing -------------------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    out_dir: Path
    plan: MergePlan
    files: list[str]


def merge_checkpoint(base: str | os.PathLike, adapters: list[AdapterSpec], out_dir: str | os.PathLike, *,
                     dtype: str | None = None, max_shard_size: str | int = "5GB", force: bool = False,
                     allow_pickle: bool = False, progress: Callable[[int, int], None] | None = None,
                     workers: int | None = None) -> MergeResult:
    """Fold ``adapters`` (weighted) into ``base`` and write a standalone model folder at ``out_dir``.

    ``progress(bytes_done_now, total_bytes)`` is called as weights are written; ``workers`` threads fold
    blocks (default: one per CPU core, at most 4)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; pass --force to replace it")
    plan = plan_merge(base, adapters, dtype, max_shard_size, allow_pickle)
    inputs = [plan.checkpoint.path] + [folder.path for _, folder in plan.adapters]
    for path in inputs:
        a, b = out_dir.resolve(), path.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise CheckpointError(f"output {out_dir} overlaps the input {path}; choose another folder")
    for note in plan.warnings:
        warnings.warn(note, stacklevel=2)
    try:
        with atomic_output_dir(out_dir, force=force) as tmp:
            names = plan.shard_names()
            total = plan.total_bytes
            _write_tensors(plan, tmp, names, lambda n: progress(n, total) if progress else None, workers)
            if len(names) > 1:
                index = {"metadata": {"total_size": plan.total_bytes},
                         "weight_map": {t.name: name for name, shard in zip(names, plan.shards) for t in shard}}
                (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            _copy_side_files(plan, tmp)
            (tmp / "README.md").write_text(model_card(plan))
            tmp.chmod(0o755)
            for child in tmp.iterdir():
                child.chmod(0o644)
            files = sorted(p.name for p in tmp.iterdir())
    except OSError as exc:  # a full disk, a file-size limit, a failing drive
        raise CheckpointError(f"{out_dir}: merge failed, output left as it was ({exc.strerror or exc}"
                              f"{f': {exc.filename}' if exc.filename else ''})") from None
    return MergeResult(out_dir, plan, files)


def _write_tensors(plan: MergePlan, folder: Path, names: list[str], progress: Callable[[int], None],
                   workers: int | None) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over blocks instead: no spin-waiting barriers on a busy machine
    workers = max(1, workers or min(4, os.cpu_count() or 1))
    window = 2 * workers + 2
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    buffers: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(window + workers + 1):  # enough that a worker never waits for one the writer holds
        buffers.put(bytearray(BLOCK_BYTES))
    try:
        with TensorReader(plan.checkpoint) as reader:
            for name, shard in zip(names, plan.shards):
                with open(folder / name, "wb", buffering=0) as f, _WriteBehind(f.fileno()) as flusher:
                    f.write(safetensors_header((t.name, t.dtype, t.source.shape, t.nbytes) for t in shard))
                    _write_shard(shard, f, reader, pool, buffers, flusher.wrote(progress), window)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _write_shard(shard: list[OutputTensor], f, reader: TensorReader, pool: ThreadPoolExecutor,
                 buffers: queue.SimpleQueue, progress: Callable[[int], None], window: int) -> None:
    pending: deque = deque()

    def write_head() -> None:
        item = pending.popleft()
        if isinstance(item, Future):
            buffer, size = item.result()
            view = memoryview(buffer)[:size]
            while view:
                view = view[f.write(view):]
            if len(buffer) == BLOCK_BYTES:
                buffers.put(buffer)
            progress(size)
        else:
            entry = item.source
            copy_range(reader.fd(entry), f.fileno(), entry.offset, entry.nbytes)
            progress(entry.nbytes)

    for t in shard:
        if t.is_copy:
            pending.append(t)
        else:
            per_row = max(1, t.source.cols) * max(4, t.source.dtype.itemsize, t.dtype.itemsize)
            # whole multiples of 8 rows: GEMM kernels take another code path for a few leftover rows, and
            # the folded values must not depend on where a block starts (bit-identical to folding at once)
            step = max(8, BLOCK_BYTES // per_row // 8 * 8)
            for start in range(0, t.source.rows, step):
                pending.append(pool.submit(_fold_block, t, reader, buffers, start, min(start + step, t.source.rows)))
                while len(pending) > window:
                    write_head()
        while pending and not isinstance(pending[0], Future):
            write_head()
    while pending:
        write_head()


class _WriteBehind:
    """Flush a file to disk while it is still being written, one ``fdatasync`` at a time on a thread of its
    own, so that the fsync before the output's rename (atomic_output_dir) finds little left to write instead
    of the whole checkpoint."""

    EVERY = 64 * 2**20

    def __init__(self, fd: int) -> None:
        self.fd, self.unflushed = fd, 0
        self.thread = ThreadPoolExecutor(1)
        self.pending: Future | None = None

    def wrote(self, progress: Callable[[int], None]) -> Callable[[int], None]:
        def counted(size: int) -> None:
            progress(size)
            self.unflushed += size
            if self.unflushed >= self.EVERY and (self.pending is None or self.pending.done()):
                self.unflushed = 0
                self.pending = self.thread.submit(os.fdatasync, self.fd)
        return counted

    def __enter__(self) -> "_WriteBehind":
        return self

    def __exit__(self, *exc) -> None:
        self.thread.shutdown(wait=True)  # the file stays open until its last flush is done


class _Scratch(threading.local):
    """Per-thread work buffers, reused block after block: no page faults, no zeroing."""

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        numel = shape[0] * shape[1]
        buf = getattr(self, name, None)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype)
            setattr(self, name, buf)
        return buf[:numel].view(shape)

    def raw(self, size: int) -> bytearray:
        if len(getattr(self, "input", b"")) < size:
            self.input = bytearray(size)
        return self.input


_scratch = _Scratch()


def _fold_block(t: OutputTensor, reader: TensorReader, buffers: queue.SimpleQueue, start: int,
                stop: int) -> tuple[bytearray, int]:
    """Rows ``[start, stop)`` of the output tensor, as bytes in a buffer from ``buffers``."""
    shape = (stop - start, t.source.cols)
    size = shape[0] * shape[1] * t.dtype.itemsize
    rows = reader.read_rows(t.source, start, stop, _scratch.raw(shape[0] * shape[1] * t.source.dtype.itemsize))
    buffer = buffers.get() if size <= BLOCK_BYTES else bytearray(size)
    if size:
        out = torch.frombuffer(buffer, dtype=t.dtype, count=shape[0] * shape[1]).view(shape)
        if t.fold is None:
            out.copy_(rows)
        else:
            weight = _scratch.get("weight", shape).copy_(rows)
            f = t.fold
            delta = _scratch.get("delta", (shape[1], shape[0]) if f.transposed else shape)
            out.copy_(f.block(weight, delta, start, stop))
    return buffer, size


def _copy_side_files(plan: MergePlan, folder: Path) -> None:
    """Config (untied when the output embedding changed), generation config, tokenizer, chat template."""
    for src in sorted(plan.checkpoint.path.iterdir()):
        if src.is_file() and src.name.endswith(COPIED_SUFFIXES) and src.name not in NOT_COPIED \
                and src.name != "config.json":
            shutil.copyfile(src, folder / src.name)
    if plan.config:
        (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")


def model_card(plan: MergePlan) -> str:
    """README.md of a merged model: what went in, with which weights, methods and dtype."""
    from . import __version__

    rows = []
    for spec, folder in plan.adapters:
        c = folder.config
        rows.append(f"| `{spec.path}` | {spec.weight:g} | {c.method} | {c.lora_r} | "
                    f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in folder.modules}))} |")
    folded = sum(1 for t in plan.tensors if t.fold is not None)
    return (f"---\nbase_model: {plan.base}\nlibrary_name: transformers\ntags:\n- ftserve\n- merge\n---\n\n"
            f"# Merged model\n\nBase model `{plan.base}` with {len(plan.adapters)} adapter(s) folded into "
            f"{folded} weight tensors by ftserve {__version__} (`ftserve merge`), in fp32 and rounded once to "
            f"{plan.dtype_name}.\n\n| adapter | weight | method | rank | targets |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n\n- dtype: {plan.dtype_name}\n- shards: {len(plan.shards)}, "
            f"{plan.total_bytes:,d} bytes of weights\n- tool: ftserve {__version__}\n\n"
            f"Load it with `transformers.AutoModelForCausalLM.from_pretrained(path)`; no ftserve needed.\n")
