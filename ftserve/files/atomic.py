"""Outputs that appear whole or not at all, and survive a power cut: a temporary folder beside the output,
fsynced, then renamed over it. Every writer of a folder (adapters, merges, exports) goes through here.

Two writers of one output never both win. The check that the output is absent (or, with ``force``, which
output is there) happens when writing starts, and again, atomically, at the final rename: a writer whose
output appeared, vanished or changed in between fails with OutputChangedError, removes its own temporary
folder and leaves what is there alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

OUTPUT_FILE_MODE = 0o644  # every file of a written output: readable by all, writable by its owner
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


class OutputChangedError(FileExistsError):
    """The output folder appeared, vanished or was replaced by someone else while this writer wrote it."""


class Identity(NamedTuple):
    """Which folder sits at a path: a rename keeps its device, inode and mtime; a new folder in its place,
    even one given the same inode number, has another mtime. (ctime is no use: the rename itself changes it.)"""

    device: int
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "Identity | None":
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, on any error it vanishes.

    Without ``force``, ``path`` must not exist, neither now nor at the final rename, which cannot replace
    anything. With ``force``, what is at ``path`` now is replaced, and only that: if ``path`` holds another
    folder at the end (or nothing, where there was one), the writer fails; if it held nothing at the start, it
    must hold nothing at the end. The loser raises OutputChangedError and removes its temporary folder.

    Durable: every file and folder in it is fsynced before the rename and the parent folder after it, so after
    a power cut ``path`` holds the old output or the new one, whole. What a killed writer leaves behind is
    named ``.NAME.tmp-<pid>-<host>-<random>`` (and ``.NAME.old-...`` for a replaced output), and the next
    writer of ``path`` on this host clears it once that pid is gone; a live writer's folders are never touched.
    """
    path = Path(path)
    remove_abandoned(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    replacing = Identity.of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{HOST_TAG}-{uuid.uuid4().hex[:8]}"
    tmp = _scratch(path, "tmp", token)
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
        if replacing is None:
            _publish(tmp, path)
        else:
            _replace(tmp, path, replacing, _scratch(path, "old", token))
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path`` only if nothing is there, atomically."""
    try:
        rename_no_replace(tmp, path)
    except FileExistsError:
        raise OutputChangedError(f"{path} appeared while this command was writing it (another writer?); it was "
                                 f"left as it is and this command's output removed. Pass force=True to replace "
                                 f"it") from None


def _replace(tmp: Path, path: Path, replacing: Identity, old: Path) -> None:
    """Move the output aside, check it is the one seen at the start, move ``tmp`` in. A mismatch puts the
    output back; a writer that publishes in the moment ``path`` is free wins, and the output moved aside, which
    this writer was told to replace, is removed."""
    changed = OutputChangedError(f"{path} was replaced or removed by someone else while this command was writing "
                                 f"it; it was left as it is and this command's output removed")
    try:
        os.rename(path, old)
    except FileNotFoundError:
        raise changed from None
    if Identity.of(old) != replacing:
        try:
            rename_no_replace(old, path)
        except FileExistsError:
            kept = old.with_name(f"{path.name}.displaced-{uuid.uuid4().hex[:8]}")
            os.rename(old, kept)
            raise OutputChangedError(f"{path} changed twice while this command was writing it; the folder that "
                                     f"was there is kept at {kept}") from None
        raise changed
    try:
        _publish(tmp, path)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if anything is at ``dst``, atomically.

    A plain rename replaces an empty folder (and, with ``os.replace``, a file) without a word, so it cannot
    tell "absent" from "empty". Linux says it in one call: ``renameat2(RENAME_NOREPLACE)``. Where that is
    missing (another OS, old glibc) or the file system refuses the flag (NFS, older FUSE), the fallback claims
    ``dst`` with ``mkdir``, which fails if anything is there, then renames onto its own empty claim: as
    exclusive between writers, at the cost of ``dst`` being an empty folder for a moment (and left so by a
    writer killed in that moment, which the next writer then refuses to overwrite without force).
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise (FileExistsError if err in (errno.EEXIST, errno.ENOTEMPTY) else OSError)(
                err, os.strerror(err), str(dst))
    os.mkdir(dst)
    os.rename(src, dst)


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_renameat2 = _load_renameat2()


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
        if set(scratch) == {"tmp", "old"}:
            with contextlib.suppress(FileExistsError):  # a newer output took its place: that one stays
                rename_no_replace(scratch["old"], path)
                del scratch["old"]
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
