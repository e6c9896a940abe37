"""A sharded checkpoint's index (``model.safetensors.index.json``) checked against the shards it names.

transformers reads a sharded checkpoint thus (``utils/hub.get_checkpoint_shard_files`` and
``modeling_utils._load_pretrained_model``, 5.x): the shard files are the sorted, distinct values of the index's
``weight_map``, refused if one is absolute or holds ``..``; then every tensor of every shard is loaded, a later
file's copy of a name replacing an earlier one's. So the index does not decide which copy of a duplicated
tensor is read, a tensor missing from the index is read all the same, and a name the index places in a shard
that lacks it is simply never found. A merge that read the copy the index names would write a model other than
the one transformers loads from the same folder.

Rather than pick a copy, a checkpoint whose shards and index disagree is refused, naming the tensor and the
files: a tensor in more than one shard, a tensor in a shard but not in the index, an index entry whose shard
lacks the tensor, a shard that is missing, or one whose path leaves the model folder (absolute, ``..``, or a
symlink resolving elsewhere; a Hugging Face cache snapshot's links into its own repository folder are fine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol, TypeVar

from ..errors import CheckpointError
from .confinement import is_inside
from .strict_json import read_json_file

MAX_INDEX_BYTES = 64 * 2**20  # about 100 bytes per tensor: a million tensors


class Named(Protocol):
    name: str


Entry = TypeVar("Entry", bound=Named)


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``: tensor name -> shard file name."""
    data = read_json_file(index, max_bytes=MAX_INDEX_BYTES, error=CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a shard index: it needs a \"weight_map\" object of tensor name -> "
                              f"shard file name")
    return weight_map


def shard_path(folder: Path, name: str, named_by: str) -> Path:
    """``folder / name``, refused (naming ``named_by``, the index or "the folder") if it leaves the folder,
    by its name as transformers checks it, or through a symlink; and refused if it is not a file."""
    if Path(name).anchor or ".." in Path(name).parts:
        raise CheckpointError(f"{folder / named_by}: shard {name!r} lies outside the model folder; a shard index "
                              f"names files inside its folder only")
    file = folder / name
    real, root = Path(os.path.realpath(file)), model_root(folder)
    if not is_inside(real, root):
        raise CheckpointError(f"{file}: a symlink to {real}, outside the model folder {root}; copy the file into "
                              f"the folder instead")
    if not file.is_file():
        raise CheckpointError(f"{folder / named_by}: names shard {name}, which is missing from {folder}")
    return file


def model_root(folder: Path) -> Path:
    """Where a model folder's files may resolve: the folder itself, or for a Hugging Face cache snapshot
    (``models--owner--name/snapshots/<revision>``), the repository's cache folder holding the blobs its links
    point to."""
    real = Path(os.path.realpath(folder))
    return real.parent.parent if real.parent.name == "snapshots" else real


def agreeing_tensors(index: Path, weight_map: dict[str, str] | None,
                     listing: dict[Path, Iterable[Entry]]) -> dict[str, Entry]:
    """Every tensor of the shards (``listing``: file -> its entries, in file order), by name, once it is shown
    that the shards and the index agree; ``weight_map`` None for a single, unindexed file."""
    tensors: dict[str, Entry] = {}
    holder: dict[str, Path] = {}
    for file, entries in listing.items():
        for entry in entries:
            if entry.name in holder:
                raise CheckpointError(f"{index.parent}: tensor {entry.name} is stored twice, in "
                                      f"{holder[entry.name].name} and in {file.name}{_named(weight_map, entry.name)}; "
                                      f"transformers would read one copy and a merge another, so remove the stray one")
            if weight_map is not None and entry.name not in weight_map:
                raise CheckpointError(f"{index}: tensor {entry.name}, stored in {file.name}, is not in the index; "
                                      f"add it to the weight_map or remove it from the shard")
            holder[entry.name], tensors[entry.name] = file, entry
    for name, shard in (weight_map or {}).items():
        if holder.get(name) != index.parent / shard:
            where = f"it is in {holder[name].name}" if name in holder else "no shard holds it"
            raise CheckpointError(f"{index}: the index places tensor {name} in {shard}, but {where}; the index "
                                  f"does not describe these shards")
    return tensors


def _named(weight_map: dict[str, str] | None, name: str) -> str:
    return f" (the index names {weight_map[name]})" if weight_map and name in weight_map else ""
