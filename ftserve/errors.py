"""One exception type per family, so the CLI and the server can turn each into a clean message or status."""


class FtserveError(Exception):
    """Base of every error ftserve raises on purpose."""


class ConfigError(FtserveError, ValueError):
    """A FineTuningConfig value, a method name or a target list is wrong."""


class AdapterFileError(FtserveError):
    """An adapter folder is missing, corrupt, or does not fit the model it is loaded into."""


class CheckpointError(FtserveError):
    """A base or merged checkpoint cannot be read or written."""


class ServingError(FtserveError):
    """A request to an engine or the server cannot be served."""


class DataError(FtserveError, ValueError):
    """Training data is missing, malformed, or of no shape ``ftserve train`` knows."""
