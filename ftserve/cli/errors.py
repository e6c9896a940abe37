"""User errors as one-line messages in the command's own words.

The library speaks Python (``pass force=True``, ``max_lora_rank``); a command's user knows its flags. So a message
that reaches the command line has the command's option names rewritten as its flags (``--force``,
``--max-lora-rank``), and no user error ends in a traceback.
"""

from __future__ import annotations

import functools
import re

import click


def in_cli_words(message: str, command: click.Command | None = None) -> str:
    """``message`` with the command's option names as its flags: ``name=True`` -> ``--name``, ``name=X`` ->
    ``--name X``, and a bare ``snake_case`` name -> ``--snake-case``; never inside a path or a quoted value
    (a folder named ``output_dir`` stays as it is)."""
    command = command or click.get_current_context().command
    options = [p for p in command.params if isinstance(p, click.Option) and p.name]
    parts = _VERBATIM.split(message)  # even indexes: prose; odd: paths and quoted values, kept verbatim
    for i in range(0, len(parts), 2):
        for param in options:
            opt, name = max(param.opts, key=len), re.escape(param.name)
            parts[i] = re.sub(rf"\b{name}=True\b", opt, parts[i])
            parts[i] = re.sub(rf"\b{name}=", f"{opt} ", parts[i])
            if "_" in param.name:
                parts[i] = re.sub(rf"(?<![-\w]){name}\b", opt, parts[i])
    return "".join(parts)


# A quoted value, or a word holding a path separator.
_VERBATIM = re.compile(r"""('[^'\n]*'|"[^"\n]*"|[^\s'"]*[/\\][^\s'"]*)""")


def clean_errors(command):
    """FtserveError and OS errors (a full disk, a permission) become `Error: ...` and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ..errors import FtserveError

        try:
            return command(*args, **kwargs)
        except (FtserveError, OSError) as exc:
            text = str(exc) if isinstance(exc, FtserveError) else \
                f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
            raise click.ClickException(in_cli_words(text)) from None

    return wrapper
