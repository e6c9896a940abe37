"""The guide's import name: ``from finetuning_toolkit import FineTuningConfig, FineTuningModel``.

Every public name of ``ftserve``, as lazily: nothing heavy is imported until a name is used.
"""

from typing import Any

import ftserve
from ftserve import __all__, __version__  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'finetuning_toolkit' has no attribute {name!r}")
    return getattr(ftserve, name)


def __dir__() -> list[str]:
    return list(__all__)
