"""ftserve: train adapters with five methods, fold them into standalone models, serve many at once."""

__version__ = "0.1.0"

from .adapter_io import AdapterFolder, export_adapter, load_adapter, read_adapter  # noqa: E402
from .config import METHODS, FineTuningConfig  # noqa: E402
from .errors import AdapterFileError, CheckpointError, ConfigError, FtserveError, ServingError  # noqa: E402
from .methods import LoraFactors  # noqa: E402
from .model import FineTuningModel  # noqa: E402

__all__ = [
    "METHODS", "AdapterFileError", "AdapterFolder", "CheckpointError", "ConfigError", "FineTuningConfig",
    "FineTuningModel", "FtserveError", "LoraFactors", "ServingError", "export_adapter", "load_adapter",
    "read_adapter", "__version__",
]
