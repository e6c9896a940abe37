"""Click options generated from declared settings (ftserve/engine/declare.py), and the objects built from them.

A field ``max_num_seqs`` declared with ``setting(32, "Requests ...", minimum=1)`` becomes
``--max-num-seqs`` of type ``IntRange(min=1)``, default 32, shown in the help as ``[default: 32]``:

- a ``bool`` field is a switch: ``--x`` when its default is False, ``--x/--no-x`` when it is True;
- an ``int`` or ``float`` field takes its declared range (``IntRange`` / ``FloatRange``);
- a text field with ``choices`` is a ``Choice``; a ``Path`` field names an existing folder, made absolute;
- a field declared ``vllm`` has its help prefixed ``vllm:``;
- a ``None`` default is shown as its ``default_text``.

``from_settings(options=EngineOptions, ...)`` adds the options of each class to a command and hands the command,
under each parameter name, the object built from their values; an option out of range (EngineOptionsError)
is reported as click reports a bad flag.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Callable

import click

from ..engine.declare import declared
from ..engine.options import EngineOptionsError, flag
from .errors import in_cli_words

VLLM_PREFIX = "vllm: "  # how the help marks an option only the vllm engine has


def _value_type(field: dataclasses.Field, hint: Any) -> Any:
    """The click type of ``field``, from its annotation ``hint`` and its declared range or choices."""
    meta = field.metadata
    kinds = set(typing.get_args(hint)) - {type(None)} or {hint}
    if meta["choices"]:
        return click.Choice(meta["choices"])
    if kinds == {Path}:
        return click.Path(exists=True, file_okay=False, path_type=Path, resolve_path=True)
    if kinds == {int}:
        return click.IntRange(meta["minimum"], meta["maximum"])
    if kinds == {float}:
        return click.FloatRange(meta["minimum"], meta["maximum"], min_open=meta["open_minimum"])
    return str


def click_option(field: dataclasses.Field, hint: Any) -> click.Option:
    """The click option of a field declared with ``setting``, whose annotation is ``hint``."""
    meta = field.metadata
    name = flag(field.name)
    help_text = meta["help"]
    if meta["vllm"]:  # "vllm: stages the layers ...", an acronym left as it is ("vllm: GPUs each layer ...")
        acronym = any(letter.isupper() for letter in help_text.split()[0][1:])
        help_text = VLLM_PREFIX + (help_text if acronym else help_text[0].lower() + help_text[1:])
    if meta["default_text"]:
        help_text += f" [default: {meta['default_text']}]"
    if hint is bool:
        names, kind = [f"{name}/--no-{name[2:]}" if field.default else name], {"is_flag": True}
    else:
        names, kind = [name, *meta["short"]], {"type": _value_type(field, hint), "metavar": meta["metavar"]}
    return click.Option([*names, field.name], default=field.default, show_default=field.default is not None,
                        help=help_text, **kind)


def click_options(*classes: type) -> list[click.Option]:
    """The click options of every field of the dataclasses ``classes`` declared with ``setting``, in their order,
    those only the vllm engine has last."""
    fields = [(field, typing.get_type_hints(cls)[field.name]) for cls in classes for field in declared(cls)]
    return [click_option(field, hint) for field, hint in sorted(fields, key=lambda pair: pair[0].metadata["vllm"])]


def build(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` built from the flag values in ``values`` (removed from it); a value out of range as a bad flag."""
    given = {field.name: values.pop(field.name) for field in declared(cls)}
    try:
        return cls(**given)
    except EngineOptionsError as exc:
        raise bad_flag(exc) from None


def bad_flag(exc: EngineOptionsError) -> click.BadParameter:
    """``exc`` as click reports a bad flag: ``Invalid value for --max-num-seqs: must be ...``."""
    return click.BadParameter(in_cli_words(exc.reason), param_hint=exc.flag)


def from_settings(**classes: type) -> Callable[[Callable], Callable]:
    """A decorator, below ``click.command()``: the options of each class in ``classes`` (parameter name ->
    dataclass) join the command's, and the command receives each parameter as the object built from them."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def with_objects(**values: Any) -> Any:
            built = {parameter: build(cls, values) for parameter, cls in classes.items()}
            return command(**values, **built)

        generated = click_options(*classes.values())
        # click lists a command's options in the reverse of the order its decorators added them
        with_objects.__click_params__ = [*getattr(command, "__click_params__", []), *reversed(generated)]
        return with_objects

    return decorate
