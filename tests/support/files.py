"""What the tests check about folders on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path: to show that a folder was not touched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
