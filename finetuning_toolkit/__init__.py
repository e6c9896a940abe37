"""The guide's import name: ``from finetuning_toolkit import FineTuningConfig, FineTuningModel``."""

from ftserve import *  # noqa: F401,F403
from ftserve import __all__, __version__  # noqa: F401
