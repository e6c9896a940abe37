"""A FineTuningModel inside transformers' ``Trainer`` and TRL's ``SFTTrainer``: the method's rules through the
trainer's own hooks, checkpoints that hold the adapter alone.

    >>> model = FineTuningModel(base, FineTuningConfig(method="lora+", target_modules=["q_proj", "v_proj"]))
    >>> trainer = AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=data)
    >>> trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

``AdapterTrainerMixin`` goes in front of any ``Trainer`` subclass (``AdapterSFTTrainer`` is TRL's). It
changes four hooks and nothing in the loop:

- ``create_optimizer``: the optimizer the arguments name (``optim``, ``learning_rate``, ``weight_decay``, or
  ``optimizer_cls_and_kwargs``) over the method's parameter groups (LoRA+: B at ``lr * ratio``), with its
  after-step rule attached (Delta-LoRA's snapshot at step K; LoRA-FA's A is frozen, so never in a group). An
  optimizer passed as ``optimizers=(optimizer, scheduler)`` gets the rule attached too: build it over
  ``model.param_groups(lr)``, or with ``model.create_optimizer(lr)``.
- ``_save``: a checkpoint (and ``save_model``) writes the adapter folder in PEFT's layout, Delta-LoRA's state
  beside it, the tokenizer and the arguments; never the base model's weights.
- ``_load_from_checkpoint`` / ``_load_best_model``: resuming reads that folder back into the model, with the
  method's step count; the trainer restores optimizer, scheduler, RNG and its state as usual.

Gradient checkpointing (``gradient_checkpointing=True``) and ``bf16`` / ``fp16`` mixed precision are the
trainer's own, applied to the wrapped model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from ..errors import AdapterFileError, ConfigError
from ..files.adapter_folder import read_adapter
from ..model import FineTuningModel, load_tensors

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name, so its tools find it


class AdapterTrainerMixin:
    """Put in front of ``Trainer`` or a subclass of it: ``class MyTrainer(AdapterTrainerMixin, DPOTrainer)``.

    Pass the FineTuningModel as ``model``. The trainer is handed the transformers model it wraps (whose layers
    already hold the adapter, injected in place, so its forward is the adapter model's), so everything the
    trainer reads off a model (its config, forward signature, labels, gradient checkpointing) is the model's
    own; ``trainer.adapter_model`` is the FineTuningModel.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.pop("model", args[0] if args else None)
        if not isinstance(given, FineTuningModel):
            raise ConfigError(f"{type(self).__name__} trains a ftserve FineTuningModel; got "
                              f"{type(given).__name__}. Wrap the base model: FineTuningModel(base, config)")
        self.adapter_model = given
        base = given.base_model
        if getattr(base, "is_quantized", False):
            # transformers refuses to train a quantized model that carries no adapter; this one carries one.
            base._hf_peft_config_loaded = True
        super().__init__(*args[1:], model=base, **kwargs)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        adapter = self.adapter_model
        if self.optimizer is None:
            given = self.optimizer_cls_and_kwargs
            optimizer_cls, kwargs = given or self.get_optimizer_cls_and_kwargs(self.args, adapter)
            lr = kwargs.get("lr", self.args.learning_rate)
            groups = adapter.param_groups(lr, self.args.weight_decay)
            # The trainer builds `optimizer_cls(params, **kwargs)` from kwargs' "params" when they carry it.
            self.optimizer_cls_and_kwargs = (optimizer_cls, {**kwargs, "params": groups})
            try:
                super().create_optimizer(model)
            finally:
                self.optimizer_cls_and_kwargs = given
        adapter.attach_training_rules(self.optimizer)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # A checkpoint folder is the trainer's, shared: the other processes of a data-parallel run write their
        # RNG states into it meanwhile, so the adapter's files are replaced one by one in it, never the folder.
        os.makedirs(output_dir, exist_ok=True)
        self.adapter_model.save_adapter(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_checkpoint_into(self.adapter_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_checkpoint_into(self.adapter_model, self.state.best_model_checkpoint)


def load_checkpoint_into(model: FineTuningModel, path: str | os.PathLike) -> None:
    """Load a checkpoint's adapter folder into ``model`` in place: tensors, Delta-LoRA's snapshot, step count."""
    folder = read_adapter(path)
    if folder.config.method != model.config.method:
        raise AdapterFileError(f"{path}: a {folder.config.method} checkpoint cannot resume a "
                               f"{model.config.method} run")
    if set(folder.modules) != set(model.adapter_layers):
        raise AdapterFileError(f"{path}: the checkpoint adapts other modules than this model "
                               f"({sorted(set(folder.modules) ^ set(model.adapter_layers))[:4]} ...)")
    load_tensors(model, folder)
    model.steps_done = int(folder.extra.get("steps_done", 0))


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """transformers' ``Trainer`` for a FineTuningModel (see the module docstring)."""


def adapter_sft_trainer() -> type:
    """TRL's ``SFTTrainer`` for a FineTuningModel; TRL is imported here, on first use."""
    try:
        from trl import SFTTrainer
    except ImportError:
        raise ConfigError("TRL is not installed: pip install 'finetuning-toolkit[train]' (or pip install trl)") from None
    return type("AdapterSFTTrainer", (AdapterTrainerMixin, SFTTrainer),
                {"__doc__": "TRL's SFTTrainer for a FineTuningModel (see ftserve.train.trainer)."})
