"""Optional dependencies: which extra each command needs, and one `Error:` line naming it when it is missing.

The core install (torch, transformers, safetensors, click) runs merge, export, verify and inspect. The other
commands import more, and a new user who installed the wrong extra should read which one to install, never a
traceback from deep inside a library (transformers' "accelerate is required when loading a GGUF file", or
``No module named 'datasets'`` after a minute of work). So a command checks its modules before it does any
work, and a module its code imports later, on a path the check did not foresee, is caught on the way out and
reported the same way. pyproject.toml's extras hold these modules' packages (tests/test_cli_extras.py checks).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable

import click

# Import name -> the package pip installs it from.
PACKAGES = {
    "fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client", "openai": "openai",
    "datasets": "datasets", "accelerate": "accelerate", "yaml": "pyyaml", "httpx": "httpx", "trl": "trl",
    "matplotlib": "matplotlib", "gguf": "gguf",
}
SERVE = ("fastapi", "uvicorn", "prometheus_client")
TRAIN = ("datasets", "accelerate")  # transformers' Trainer and its GGUF reader need accelerate


def missing(modules: Iterable[str]) -> list[str]:
    """Those of ``modules`` that cannot be imported here."""
    absent = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent that is not importable; a module without a spec
            found = False
        if not found:
            absent.append(module)
    return absent


def install_hint(command: str, extra: str, modules: Iterable[str]) -> str:
    packages = " and ".join(dict.fromkeys(PACKAGES.get(m, m) for m in modules))
    return (f"`ftserve {command}` needs {packages}, which {'is' if ' and ' not in packages else 'are'} not "
            f"installed: pip install 'finetuning-toolkit[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


def require(command: str, extra: str, modules: Iterable[str]) -> None:
    """Refuse to start ``command`` when one of ``modules`` is missing, naming ``extra``."""
    absent = missing(modules)
    if absent:
        raise click.ClickException(install_hint(command, extra, absent))


def needs_extra(command: click.Command, extra: str, modules: Iterable[str] = ()) -> click.Command:
    """``command`` checking ``modules`` before it runs (after its flags are read, so ``--help`` works without
    them), and reporting a module of PACKAGES that a later import finds missing as the same one line."""
    modules = tuple(modules)
    callback = command.callback

    @functools.wraps(callback)
    def checked(*args, **kwargs):
        require(command.name, extra, modules)
        try:
            return callback(*args, **kwargs)
        except ModuleNotFoundError as exc:
            module = (exc.name or "").partition(".")[0]
            if module not in PACKAGES:
                raise
            raise click.ClickException(install_hint(command.name, extra, [module])) from None

    command.callback = checked
    return command
