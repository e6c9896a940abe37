"""Settings declared once: a dataclass field with its default, its help text and its range.

``EngineOptions`` (options.py) and the server's ``ServerSettings`` declare each of their flags with ``setting``;
``ftserve serve`` generates its command-line flags from those declarations (cli/options.py), so a default, a
range or a help text is written in one place. A field declared as a plain dataclass field is no flag.

The metadata a declaration carries, read by ``declared`` and by the flag generator:

- ``help``: one or two sentences of prose, as ``--help`` and docs/cli.md print them;
- ``minimum``, ``maximum``, ``open_minimum``: the range of a number (``open_minimum``: the minimum itself is out);
- ``choices``: the values a text setting accepts;
- ``default_text``: what a ``None`` default means, printed as ``[default: ...]``;
- ``short``: further names of the flag (``-tp``);
- ``metavar``: the placeholder of its value in the help (``SIZE``);
- ``vllm``: a vLLM option passed through as it is; an engine without such a thing refuses a value other than
  the default.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
            open_minimum: bool = False, choices: tuple[str, ...] | None = None, default_text: str | None = None,
            short: tuple[str, ...] = (), metavar: str | None = None, vllm: bool = False) -> Any:
    """A dataclass field that is a flag of ``ftserve serve``: its one default and its one help text."""
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "open_minimum": open_minimum,
                "choices": choices, "default_text": default_text, "short": short, "metavar": metavar, "vllm": vllm}
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of the dataclass ``cls`` declared with ``setting``, in their order."""
    return tuple(field for field in dataclasses.fields(cls) if "help" in field.metadata)


def out_of_range(field: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is not an integer in ``field``'s declared range (``must be an integer >= 1; got 0``), None
    if it is; None as well for a ``None`` value of a field whose default is ``None``."""
    if value is None and field.default is None:
        return None
    low, high = field.metadata.get("minimum"), field.metadata.get("maximum")
    if isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low) \
            and (high is None or value <= high):
        return None
    wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
    return f"must be an integer {wanted}; got {value!r}"
