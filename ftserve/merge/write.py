"""Merge, writing: the planned checkpoint written tensor by tensor, folded in fp32 blocks by worker threads.

Memory stays bounded whatever the model size: tensors are read, folded and written in blocks of whole stored
rows (for a low-rank delta ``W'[i:j]`` needs only ``W[i:j]`` and ``B[i:j]``, or ``A[:, i:j]`` when transposed),
untouched tensors are copied by file offset, and output files are written header first then byte by byte
(files/output_file.py: straight to the device where the file system takes direct I/O). Each tensor's fold comes from the merge's combiner (combine.py), which this module drives without
knowing which it is: when the fold asks for a first pass, every block is read and scanned before the first one
is folded (as many passes as it asks). Worker threads (one per core, one intra-op thread each) scan and fold blocks while the main thread
writes them in order. The output folder appears whole at the end (temporary folder beside it, then a rename) or
not at all.
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
from contextlib import ExitStack, contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files.atomic import OutputChangedError, atomic_output_dir
from ..files.checkpoint import INDEX, TensorReader, safetensors_header
from ..files.output_file import OutputFile
from .combine import Combiner, ZeroNormRowError
from .plan import BLOCK_BYTES, COPIED_SUFFIXES, NOT_COPIED, AdapterSpec, MergePlan, OutputTensor, plan_merge

if TYPE_CHECKING:
    from .request import MergeRequest

MAX_WORKERS = 4  # default folding threads, at most one per core
# Blocks are whole multiples of this many rows: GEMM kernels take another code path for a few leftover rows,
# and the folded values must not depend on where a block starts (bit-identical to folding at once).
ROW_MULTIPLE = 8


@dataclass
class MergeResult:
    out_dir: Path
    plan: MergePlan
    files: list[str]


def merge_checkpoint(base: str | os.PathLike, adapters: list[AdapterSpec], out_dir: str | os.PathLike, *,
                     dtype: str | None = None, max_shard_size: str | int = "5GB", force: bool = False,
                     allow_pickle: bool = False, progress: Callable[[int, int], None] | None = None,
                     workers: int | None = None, combiner: Combiner | None = None) -> MergeResult:
    """Fold ``adapters`` (weighted) into ``base`` and write a standalone model folder at ``out_dir``.

    ``progress(bytes_done_now, total_bytes)`` is called as weights are written; ``workers`` threads fold
    blocks (default: one per CPU core, at most MAX_WORKERS); ``combiner`` combines the adapters on each tensor (default:
    the weighted sum)."""
    out_dir = _refuse_existing(out_dir, force)
    with one_torch_thread():  # the plan's checks are many small ops: no thread team to wait on
        plan = plan_merge(base, adapters, dtype, max_shard_size, allow_pickle, combiner)
    return _write_plan(plan, out_dir, {"README.md": model_card(plan)}, force, progress, workers)


def merge_models(request: "MergeRequest", out_dir: str | os.PathLike, *, max_shard_size: str | int = "5GB",
                 force: bool = False, progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                 allow_pickle: bool = False) -> MergeResult:
    """Merge the models of ``request`` (model folders, hub ids, ``model+adapter`` pairs, bare adapters on its
    base) with its mergekit method, and write a standalone model folder at ``out_dir``: the base's layout,
    config and tokenizer, a README.md that records method, parameters, seed and inputs, and the recipe as
    ``mergekit_config.yml``. Everything is checked first (inputs.py); the same streaming as merge_checkpoint."""
    from .inputs import models_card, plan_models
    from .request import request_yaml

    out_dir = _refuse_existing(out_dir, force)
    with one_torch_thread():
        plan = plan_models(request, max_shard_size, allow_pickle)
    files = {"README.md": models_card(plan), "mergekit_config.yml": request_yaml(request)}
    return _write_plan(plan, out_dir, files, force, progress, workers)


def _refuse_existing(out_dir: str | os.PathLike, force: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} already exists; pass force=True to replace it")
    return out_dir


def _write_plan(plan: MergePlan, out_dir: Path, texts: dict[str, str], force: bool,
                progress: Callable[[int, int], None] | None, workers: int | None) -> MergeResult:
    """Write ``plan`` and the text files ``texts`` (name -> content) into ``out_dir``, atomically."""
    for path in plan.inputs:
        a, b = out_dir.resolve(), path.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise CheckpointError(f"output {out_dir} overlaps the input {path}; choose another folder")
    for note in plan.warnings:
        warnings.warn(note, stacklevel=3)
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
            for name, text in texts.items():
                (tmp / name).write_text(text)
            tmp.chmod(0o755)
            for child in tmp.iterdir():
                child.chmod(0o644)
            files = sorted(p.name for p in tmp.iterdir())
    except OutputChangedError:  # another writer won the output: its own message says so
        raise
    except FileExistsError:  # absent when this command began (_refuse_existing), there once its plan was made
        raise OutputChangedError(f"{out_dir} appeared while this command was writing it (another writer?); it was "
                                 f"left as it is. Pass force=True to replace it") from None
    except OSError as exc:  # a full disk, a file-size limit, a failing drive
        raise CheckpointError(f"{out_dir}: merge failed, output left as it was ({exc.strerror or exc}"
                              f"{f': {exc.filename}' if exc.filename else ''})") from None
    return MergeResult(out_dir, plan, files)


def _write_tensors(plan: MergePlan, folder: Path, names: list[str], progress: Callable[[int], None],
                   workers: int | None) -> None:
    workers = max(1, workers or min(MAX_WORKERS, os.cpu_count() or 1))
    window = 2 * workers + 2
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))
    buffers: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(window + workers + 1):  # enough that a worker never waits for one the writer holds
        buffers.put(bytearray(BLOCK_BYTES))
    try:
        with one_torch_thread(), TensorReader(plan.checkpoint) as reader, ExitStack() as others:
            for other in plan.readers:
                others.enter_context(other)
            for name, shard in zip(names, plan.shards):
                with OutputFile(folder / name) as f:
                    f.write(safetensors_header((t.name, t.dtype, t.source.shape, t.nbytes) for t in shard))
                    _write_shard(shard, f, reader, pool, buffers, progress, window)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def one_torch_thread():
    """torch's intra-op parallelism off while the merge runs, the previous setting back after. A merge's ops
    are small (a plan's checks on adapter factors) or run on worker threads of their own (parallel over
    blocks): a thread team would spin at its barriers waiting for a peer that a busy machine has descheduled,
    which measured ten times the CPU time of the plan itself on two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_shard(shard: list[OutputTensor], f: OutputFile, reader: TensorReader, pool: ThreadPoolExecutor,
                 buffers: queue.SimpleQueue, progress: Callable[[int], None], window: int) -> None:
    pending: deque = deque()

    def write_head() -> None:
        item = pending.popleft()
        if isinstance(item, Future):
            buffer, size = item.result()
            f.write(memoryview(buffer)[:size])
            if len(buffer) == BLOCK_BYTES:
                buffers.put(buffer)
            progress(size)
        else:
            entry = item.source
            f.copy(reader.fd(entry), entry.offset, entry.nbytes)
            progress(entry.nbytes)

    for t in shard:
        if t.is_copy:
            pending.append(t)
        else:
            itemsize = max(torch.float32.itemsize, t.source.dtype.itemsize, t.dtype.itemsize)
            per_row = max(1, t.source.cols) * itemsize
            step = max(ROW_MULTIPLE, BLOCK_BYTES // per_row // ROW_MULTIPLE * ROW_MULTIPLE)
            blocks = [(start, min(start + step, t.source.rows)) for start in range(0, t.source.rows, step)]
            for _ in range(t.fold.passes if t.fold is not None else 0):
                with _named(t):
                    t.fold.gather(_scanned(t, reader, pool, blocks, window))
            _last_pass(t)
            for start, stop in blocks:
                pending.append(pool.submit(_fold_block, t, reader, buffers, start, stop))
                while len(pending) > window:
                    write_head()
        while pending and not isinstance(pending[0], Future):
            write_head()
    while pending:
        write_head()


def _scanned(t: OutputTensor, reader: TensorReader, pool: ThreadPoolExecutor, blocks: list[tuple[int, int]],
             window: int):
    """The first pass's result for each block, in block order, scanned by the workers at most ``window`` blocks
    ahead of the fold's ``gather``."""
    ahead: deque[Future] = deque()
    for start, stop in blocks:
        ahead.append(pool.submit(_scan_block, t, reader, start, stop))
        if len(ahead) > window:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


class _Scratch(threading.local):
    """Per-thread work buffers, reused block after block: no page faults, no zeroing."""

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        numel = math.prod(shape)
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


def _stored_rows(t: OutputTensor, reader: TensorReader, start: int, stop: int, keep_cache: bool = False) -> Tensor:
    """Rows ``[start, stop)`` of the stored tensor as read, in this thread's input buffer."""
    return reader.read_rows(t.source, start, stop, _scratch.raw((stop - start) * t.source.cols
                                                                * t.source.dtype.itemsize), keep_cache)


@contextmanager
def _named(t: OutputTensor):
    """A row scale that divides by zero (ZeroNormRowError), said of the tensor being folded."""
    try:
        yield
    except ZeroNormRowError as exc:
        raise CheckpointError(f"{t.name}: {exc}; nothing was written") from None


def _last_pass(t: OutputTensor) -> None:
    """From now on no block of ``t`` is read again: its inputs' bytes may leave the page cache as read."""
    if t.inputs is not None:
        from .inputs import keep_in_cache

        keep_in_cache(t.inputs, False)


def _scan_block(t: OutputTensor, reader: TensorReader, start: int, stop: int) -> Any:
    """The fold's first pass over rows ``[start, stop)`` of the stored tensor, in fp32 (its bytes stay in the
    page cache: the folding pass reads them again)."""
    rows = _scratch.get("weight", (stop - start, t.source.cols)).copy_(_stored_rows(t, reader, start, stop, True))
    return t.fold.scan(rows, _scratch.get, start, stop)


def _fold_block(t: OutputTensor, reader: TensorReader, buffers: queue.SimpleQueue, start: int,
                stop: int) -> tuple[bytearray, int]:
    """Rows ``[start, stop)`` of the output tensor, as bytes in a buffer from ``buffers``."""
    shape = (stop - start, t.source.cols)
    size = shape[0] * shape[1] * t.dtype.itemsize
    rows = _stored_rows(t, reader, start, stop)
    buffer = buffers.get() if size <= BLOCK_BYTES else bytearray(size)
    if size:
        out = torch.frombuffer(buffer, dtype=t.dtype, count=shape[0] * shape[1]).view(shape)
        if t.fold is None:
            out.copy_(rows)
        else:
            weight = _scratch.get("weight", shape).copy_(rows)
            with _named(t):
                out.copy_(t.fold.block(weight, _scratch.get, start, stop))
            if not all_finite(out):  # the plan bounds a low-rank delta; this is exact, per block
                what = "merging the models" if t.inputs is not None else "folding the adapters"
                raise CheckpointError(f"{t.name}: {what} gives inf or NaN in {t.dtype} in rows {start}-{stop - 1}; "
                                      f"nothing was written. Lower the weights (or the adapters' scale), or merge to "
                                      f"a wider dtype")
    return buffer, size


def all_finite(t: Tensor) -> bool:
    """No inf or NaN in ``t``: its smallest and largest value, which a NaN anywhere makes NaN (``aminmax``
    propagates it), are finite. One pass without a temporary, a tenth of ``isfinite(t).all()``'s time."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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
    from ..version import __version__

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
