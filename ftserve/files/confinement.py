"""Keep a folder's reads inside a root, whatever symlinks it holds.

``confine_folder(folder, root)`` walks ``folder`` recursively and refuses it if the folder itself or any entry
in it resolves (``os.path.realpath``, so through every symlink, file or folder) outside ``root``. A symlink
that stays inside the root is fine; a symlinked subfolder inside the root is walked too, once. Checking the
whole tree rather than the files a loader means to open keeps one rule for every reader (safetensors, JSON,
a tokenizer that picks its own files), and a dangling link is refused like any other that leads out.

Limits: the check runs before the reads, not inside each ``open``, so someone who can write into the root can
swap a file for a link between the two (a race); callers re-check before every read to keep that window
short. A hard link is a file, not a link, and is not detected. Only people who can write into the root can
do either, and they are trusted to that extent.

Nothing here imports from the engine or the server: each caller passes its own error type, so a refusal
stays in the caller's error family.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FtserveError


def is_inside(real: Path, real_root: Path) -> bool:
    """True if the resolved path ``real`` is ``real_root`` or below it (both already resolved)."""
    return real == real_root or real_root in real.parents


def first_outside(folder: Path, root: Path) -> Path | None:
    """The first path, ``folder`` or an entry below it, whose real path lies outside ``root``; None if none."""
    real_root = Path(os.path.realpath(root))
    real_folder = Path(os.path.realpath(folder))
    if not is_inside(real_folder, real_root):
        return Path(folder)
    seen, pending = {real_folder}, [Path(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                real = Path(os.path.realpath(entry.path))
                if not is_inside(real, real_root):
                    return Path(entry.path)
                # Links inside the root are followed, each real folder once, so a link to an ancestor ends.
                if entry.is_dir() and real not in seen:
                    seen.add(real)
                    pending.append(Path(entry.path))
    return None


def confine_folder(folder: str | os.PathLike, root: str | os.PathLike, error: type[FtserveError]) -> None:
    """Raise ``error`` naming the offending path if anything in ``folder`` resolves outside ``root``; OSError
    if the folder cannot be walked (the caller words that in its own family: it is not a refusal)."""
    folder, root = Path(folder), Path(root)
    bad = first_outside(folder, root)
    if bad is None:
        return
    what = "the folder" if bad == folder else f"{bad.relative_to(folder).as_posix()!r}"
    raise error(f"adapter folder {folder}: {what} resolves (through a symlink) outside the adapter root {root}; "
                f"adapters loaded at runtime read only files inside the root. Replace the link with a copy of "
                f"its target inside the root.")
