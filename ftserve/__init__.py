"""ftserve: train adapters with six methods, fold them into standalone models, serve many at once.

The public names are imported on first use (PEP 562), so ``import ftserve`` and the CLI's ``--help`` do not
pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "AdapterFolder": "ftserve.files.adapter_folder",
    "export_adapter": "ftserve.files.adapter_folder",
    "export_approximate": "ftserve.merge",
    "read_adapter": "ftserve.files.adapter_folder",
    "METHODS": "ftserve.config",
    "FineTuningConfig": "ftserve.config",
    "AdapterFileError": "ftserve.errors",
    "CheckpointError": "ftserve.errors",
    "ConfigError": "ftserve.errors",
    "DataError": "ftserve.errors",
    "FtserveError": "ftserve.errors",
    "ServingError": "ftserve.errors",
    "LoraFactors": "ftserve.methods",
    "FineTuningModel": "ftserve.model",
    "load_adapter": "ftserve.model",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .config import METHODS, FineTuningConfig
    from .errors import AdapterFileError, CheckpointError, ConfigError, DataError, FtserveError, ServingError
    from .files.adapter_folder import AdapterFolder, export_adapter, read_adapter
    from .merge import export_approximate
    from .methods import LoraFactors
    from .model import FineTuningModel, load_adapter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ftserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
