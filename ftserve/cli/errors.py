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
    ``--name X``, and a bare ``snake_case`` name -> ``--snake-case``."""
    command = command or click.get_current_context().command
    for param in command.params:
        if not isinstance(param, click.Option) or not param.name:
            continue
        opt = max(param.opts, key=len)
        name = re.escape(param.name)
        message = re.sub(rf"\b{name}=True\b", opt, message)
        message = re.sub(rf"\b{name}=", f"{opt} ", message)
        if "_" in param.name:
            message = re.sub(rf"(?<![-\w]){name}\b", opt, message)
    return message


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
