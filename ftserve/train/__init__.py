"""Training: a FineTuningModel inside transformers' Trainer and TRL's SFTTrainer (``trainer``), and the
``ftserve train`` command built on them. Names are imported on first use, so importing this package costs
nothing until one is asked for."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterTrainer": "ftserve.train.trainer",
    "AdapterTrainerMixin": "ftserve.train.trainer",
    "adapter_sft_trainer": "ftserve.train.trainer",
    "load_checkpoint_into": "ftserve.train.trainer",
    "load_base_model": "ftserve.train.quantized",
    "TrainSettings": "ftserve.train.settings",
    "train": "ftserve.train.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ftserve.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
