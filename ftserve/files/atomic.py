"""Outputs that appear whole or not at all, and survive a power cut: a temporary folder beside the output,
fsynced, then renamed over it. Every writer of a folder (adapters, merges, exports) goes through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator

HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, on any error it vanishes.

    Durable: every file and folder in it is fsynced before the rename and the parent folder after it, so after
    a power cut ``path`` holds the old output or the new one, whole. What a killed writer leaves behind is
    named ``.NAME.tmp-<pid>-<host>-<random>`` (and ``.NAME.old-...`` for a replaced output), and the next
    writer of ``path`` on this host clears it once that pid is gone; a live writer's folders are never touched.
    """
    path = Path(path)
    remove_abandoned(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}"
    tmp = _scratch(path, "tmp", token)
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
        if path.exists():
            old = _scratch(path, "old", token)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            fsync(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned(path: Path) -> None:
    """Remove the scratch folders of ``path``'s writers on this host whose process is gone. A writer killed
    between moving the old output aside and moving the new one in left no ``path``: the old one is put back."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-((\d+)-{HOST_TAG}-[0-9a-f]{{8}})")
    dead: dict[str, dict[str, Path]] = {}
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_alive(int(match.group(3))):
            dead.setdefault(match.group(2), {})[match.group(1)] = entry
    for scratch in dead.values():
        if set(scratch) == {"tmp", "old"} and not path.exists():
            os.replace(scratch.pop("old"), path)
        for entry in scratch.values():
            shutil.rmtree(entry, ignore_errors=True)


def _scratch(path: Path, kind: str, token: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{token}"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote; leave its folder alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root, topdown=False):  # each folder after what it holds
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
