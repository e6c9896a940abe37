"""Base checkpoints on disk: find them, list their tensors without loading any, read tensor rows by file
offset, and write safetensors files incrementally.

The safetensors format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
with offsets relative to the end of the header, then the raw little-endian tensor bytes without holes. So a
tensor's rows ``[i, j)`` are the bytes ``[begin + i * row_bytes, begin + j * row_bytes)``: we read them with
``pread`` into our own buffers (no mmap, so pages we have read do not count in our RSS) and write output files
header first, then bytes in order, never holding a whole tensor or shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from ..errors import CheckpointError
from .hub import resolve_folder
from .shard_index import agreeing_tensors, read_weight_map, shard_path
from .strict_json import StrictJSONError, loads_strict, read_json_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
HEADER_DEPTH = 3  # {name: {"shape": [...]}}, and "__metadata__": {key: string}
MAX_CONFIG_BYTES = 16 * 2**20  # config.json: a few KB; label maps make some larger
LENGTH_PREFIX = struct.calcsize("<Q")  # a safetensors file starts with its header's length, a little-endian u64
DATA_ALIGNMENT = 8
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are (``offset`` into ``file``; None for a pickled tensor)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def cols(self) -> int:
        """Elements per row: a tensor is read and written as (rows, cols) blocks of whole rows."""
        return self.numel // self.rows if self.rows else 0


@dataclass
class Checkpoint:
    """The tensors of a Hugging Face model folder, in file order, without their data."""

    path: Path
    tensors: dict[str, TensorEntry]
    pickled: bool = False
    _pickles: dict[Path, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(e.file for e in self.tensors.values()))

    def config(self) -> dict:
        file = self.path / "config.json"
        if not file.is_file():
            return {}
        return read_json_file(file, max_bytes=MAX_CONFIG_BYTES, error=CheckpointError)

    def pickled_tensor(self, entry: TensorEntry) -> Tensor:
        return self._pickles[entry.file][entry.name]


def resolve_base(name_or_path: str | os.PathLike) -> Path:
    """A local model folder, or a Hugging Face model id looked up through huggingface_hub (the local cache
    answers offline with ``HF_HUB_OFFLINE=1``)."""
    return resolve_folder(name_or_path, "model", allow_patterns=HUB_PATTERNS, error=CheckpointError)


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """(header without ``__metadata__``, absolute offset where tensor data starts)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(LENGTH_PREFIX)
            if len(raw) != LENGTH_PREFIX:
                raise CheckpointError(f"{file}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES or length > os.fstat(f.fileno()).st_size:
                raise CheckpointError(f"{file}: header length {length} is implausible; corrupt safetensors file")
            header = loads_strict(f.read(length), what=f"{file}: its safetensors header", max_depth=HEADER_DEPTH)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror})") from None
    except StrictJSONError as exc:
        raise CheckpointError(f"{exc.message}; corrupt safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: its safetensors header is not a JSON object; corrupt safetensors file")
    header.pop("__metadata__", None)
    return header, 8 + length


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    """List a model folder's tensors: safetensors (sharded or not), or pickled ``.bin`` only when allowed,
    read with ``torch.load(weights_only=True, mmap=True)``. A checkpoint whose shards and index disagree, or
    whose files lie outside the folder, is refused (see shard_index.py)."""
    path = Path(path)
    for index_name, single, pickled in ((INDEX, SINGLE, False), (PICKLE_INDEX, PICKLE_SINGLE, True)):
        if (path / index_name).is_file():
            weight_map = read_weight_map(path / index_name)
            files = [shard_path(path, name, index_name) for name in dict.fromkeys(weight_map.values())]
        elif (path / single).is_file():
            weight_map, files = None, [shard_path(path, single, single)]
        else:
            continue
        if pickled:
            listing, pickles = _open_pickled(path, files, allow_pickle)
        else:
            listing, pickles = {file: _stored_tensors(file) for file in files}, {}
        tensors = agreeing_tensors(path / index_name, weight_map, listing)
        return Checkpoint(path, tensors, pickled, pickles)
    raise CheckpointError(f"{path}: no {SINGLE}, {INDEX}, {PICKLE_SINGLE} or {PICKLE_INDEX}; not a model folder")


def _stored_tensors(file: Path) -> list[TensorEntry]:
    """A safetensors file's tensors in data order, each checked to lie inside the file with the size its dtype
    and shape give; a header that says otherwise would have us read another tensor's bytes."""
    header, start = read_safetensors_header(file)
    data_bytes = file.stat().st_size - start
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            numel = math.prod(shape)
            fits = all(type(v) is int and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{file}: tensor {name} has no valid dtype, shape and data_offsets in the header; "
                                  f"corrupt safetensors file") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, which we cannot read")
        if not fits or end - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize or end > data_bytes:
            raise CheckpointError(f"{file}: tensor {name} ({dtype}, shape {list(shape)}) has data_offsets "
                                  f"[{begin}, {end}), which are not its size or lie past the {data_bytes} bytes "
                                  f"of data; corrupt or truncated safetensors file")
        entries.append(TensorEntry(name, file, SAFETENSORS_DTYPES[dtype], shape, start + begin, end - begin))
    return sorted(entries, key=lambda e: e.offset)


def _open_pickled(path: Path, files: list[Path],
                  allow_pickle: bool) -> tuple[dict[Path, list[TensorEntry]], dict[Path, dict[str, Tensor]]]:
    if not allow_pickle:
        raise CheckpointError(f"{path}: weights are pickled {files[0].name} files; refusing to unpickle them. "
                              f"Convert them to safetensors, or pass allow_pickle=True (read with weights_only=True)")
    pickles, listing = {}, {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for bad or unsafe pickles
            raise CheckpointError(f"{file}: cannot be read safely ({exc})") from None
        pickles[file] = state
        listing[file] = [TensorEntry(name, file, t.dtype, tuple(t.shape), None, t.numel() * t.element_size())
                         for name, t in state.items()]
    return listing, pickles


class TensorReader:
    """Reads row blocks of a checkpoint's tensors; safe to call from several threads (pread)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> "TensorReader":
        if not self.checkpoint.pickled:
            for file in self.checkpoint.files:
                self._fds[file] = os.open(file, os.O_RDONLY)
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, entry: TensorEntry) -> int:
        return self._fds[entry.file]

    def read_rows(self, entry: TensorEntry, start: int, stop: int, buffer: bytearray | None = None,
                  keep_cache: bool = False) -> Tensor:
        """Rows ``[start, stop)`` as a (stop - start, cols) tensor of the stored dtype, read into ``buffer``
        (reused by the caller) when given. The bytes leave the page cache unless ``keep_cache`` (a pass that
        will read them again)."""
        if entry.offset is None:
            return self.checkpoint.pickled_tensor(entry).reshape(entry.rows, entry.cols)[start:stop]
        row_bytes = entry.nbytes // entry.rows if entry.rows else 0
        begin, size = entry.offset + start * row_bytes, (stop - start) * row_bytes
        if size == 0:
            return torch.empty(stop - start, entry.cols, dtype=entry.dtype)
        buffer = buffer if buffer is not None and len(buffer) >= size else bytearray(size)
        read_exact(self._fds[entry.file], memoryview(buffer)[:size], begin, entry.file)
        if not keep_cache:
            drop_cache(self._fds[entry.file], begin, size)
        count = (stop - start) * entry.cols
        return torch.frombuffer(buffer, dtype=entry.dtype, count=count).view(stop - start, entry.cols)


def read_exact(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{file}: ends early; truncated safetensors file")
        done += n


def drop_cache(fd: int, offset: int, size: int) -> None:
    """Tell the kernel we will not read these input bytes again, so a merge does not crowd the page cache."""
    if hasattr(os, "posix_fadvise") and size:
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)


def safetensors_header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...], int]]) -> bytes:
    """The length prefix and JSON header for tensors ``(name, dtype, shape, nbytes)`` stored in that order,
    padded with spaces so the data starts DATA_ALIGNMENT-byte aligned (as the reference writer does)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(LENGTH_PREFIX + len(raw)) % DATA_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``1000`` -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise CheckpointError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise CheckpointError(f"size {text!r} must be at least one byte")
    return int(value)


def module_in_features(base: str | os.PathLike, module_names: list[str]) -> dict[str, int]:
    """Input size of each named linear module of a base model, from its config.json alone: the model is
    instantiated on the meta device, so no weights are read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..methods.base import TARGETABLE, linear_shape

    path = resolve_base(base)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{base}: cannot read its config.json ({exc})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = {}
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{base}: the adapter's module {name} is not part of this "
                                  f"{type(model).__name__}") from None
        if not isinstance(module, TARGETABLE):
            raise CheckpointError(f"{base}: {name} is a {type(module).__name__}, not a linear layer")
        sizes[name] = linear_shape(module)[1]
    return sizes
