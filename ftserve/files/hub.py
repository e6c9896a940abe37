"""Turn "a local folder or a Hugging Face Hub repo id" into a local folder, the same way for every caller.

A name that exists locally is used as is. A name that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``)
and does not exist is an error naming it, never a Hub lookup. Anything else (``owner/name``, ``gpt2``) goes to
``huggingface_hub.snapshot_download``, which answers from the local hub cache when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FtserveError


def looks_like_path(name: str) -> bool:
    """True for names a Hub repo id can never be: relative, absolute or home paths, or deeper than owner/name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_folder(name_or_path: str | os.PathLike, what: str, allow_patterns: list[str] | None = None,
                   error: type[FtserveError] = FtserveError) -> Path:
    """The local folder for ``name_or_path``; ``what`` ("model", "adapter") words the messages, and ``error``
    is the exception type raised, so each caller keeps its own error family.

    ``allow_patterns`` limits which files a Hub download fetches (as ``snapshot_download`` reads it).
    """
    name = os.fspath(name_or_path)
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            return local
        if local.exists():
            raise error(f"{name}: a file, not a {what} folder")
    except OSError as exc:  # a name too long for the file system, a folder we may not enter, ...
        raise error(f"{name}: cannot be opened as a folder ({exc.strerror or exc})") from None
    if looks_like_path(name):
        raise error(f"{name}: no such {what} folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except HFValidationError:
        raise error(f"{name}: no such folder, and not a valid Hugging Face {what} id") from None
    except Exception as exc:  # the hub raises many kinds: not found, gated, offline, network
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise error(f"{name}: no such folder, and the Hugging Face hub cannot provide it "
                    f"({type(exc).__name__}: {reason})") from None
