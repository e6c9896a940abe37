"""FineTuningModel: a transformers causal LM with one adapter method injected in place; adapter folders
saved from it and loaded onto a base model.

The wrapped model is modified in place, as PEFT does: every target ``nn.Linear`` / ``Conv1D`` is replaced by
the method's AdapterLayer holding the original layer as ``base_layer``; every base parameter is frozen.
"""

from __future__ import annotations

import dataclasses
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .config import EXTRA_KEY, FineTuningConfig
from .errors import AdapterFileError, ConfigError
from .files.adapter_folder import (
    ADAPTER_WEIGHTS,
    PREFIX,
    AdapterFolder,
    plain_lora,
    read_adapter,
    write_adapter_folder,
)
from .methods import AdapterLayer, get_method
from .methods.base import LoraFactors, linear_shape, targetable_types

NAMES_LISTED = 5  # module names quoted in an error; the rest are elided
PROBLEMS_LISTED = 8  # mismatches quoted when an adapter does not fit; the rest are counted

# Targets used when none are given, as PEFT's defaults for the same model types.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"], "falcon": ["query_key_value"], "bloom": ["query_key_value"],
}


def find_targets(model: nn.Module, config: FineTuningConfig,
                 module_names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs the config targets; a clear ConfigError when nothing fits."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ConfigError("this model already carries ftserve adapter layers; start again from the base model")
    linear = {name: m for name, m in model.named_modules() if isinstance(m, targetable_types())}
    if module_names is not None:
        missing = [n for n in module_names if n not in linear]
        if missing:
            raise ConfigError(f"the adapter targets modules this model lacks or that are not linear: "
                              f"{missing[:NAMES_LISTED]}{' ...' if len(missing) > NAMES_LISTED else ''}")
        return [(n, linear[n]) for n in module_names]
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"no default target_modules for model type {model_type!r}; set target_modules, "
                              f"e.g. to some of {_leaf_names(linear)}")
        targets = DEFAULT_TARGETS[model_type]
    if targets == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n, m in linear.items() if m is not output]
    elif isinstance(targets, str):
        chosen = [n for n in _all_names(model) if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in _all_names(model) if any(n == t or n.endswith("." + t) for t in targets)]
    wrong = [n for n in chosen if n not in linear]
    if wrong:
        kind = type(model.get_submodule(wrong[0])).__name__
        raise ConfigError(f"target_modules {targets!r} match {wrong[0]!r}, a {kind}, not a linear layer; "
                          f"linear layers of this model: {_leaf_names(linear)}")
    if not chosen:
        raise ConfigError(f"target_modules {targets!r} match no module of this {type(model).__name__}; "
                          f"its linear layers are: {_leaf_names(linear)}")
    return [(n, linear[n]) for n in chosen]


def _all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _leaf_names(linear: dict[str, nn.Module]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in linear})


class FineTuningModel(nn.Module):
    """A causal LM with a trainable adapter. Forwards, generates and returns ``.loss`` like the wrapped model.

    >>> model = FineTuningModel(base, FineTuningConfig(method="lora", lora_r=16, target_modules=["q_proj"]))
    >>> optimizer = model.create_optimizer(lr=2e-4)

    ``module_names`` pins the exact modules to adapt (loading uses it); otherwise ``config.target_modules``
    decides.
    """

    def __init__(self, base_model: nn.Module, config: FineTuningConfig, *,
                 module_names: list[str] | None = None) -> None:
        super().__init__()
        if not isinstance(config, FineTuningConfig):
            raise ConfigError(f"config must be a FineTuningConfig; got {type(config).__name__}")
        targets = find_targets(base_model, config, module_names)
        name = config.base_model_name_or_path
        if name is None:
            name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
        if name is not None and Path(name).is_dir():  # a local folder: absolute, so it loads from anywhere
            name = str(Path(name).resolve())
        config = config.replace(base_model_name_or_path=name)
        self.config = config
        self.method = get_method(config.method)
        self.steps_done = 0
        self._optimizer_steps: dict[int, int] = {}  # id(optimizer) -> its steps, counted from its attach round
        self._rounds = 0
        for param in base_model.parameters():
            param.requires_grad_(False)
        shared = self.method.create_shared(config, [linear_shape(m) for _, m in targets])
        if shared is not None:
            self.shared = shared.to(targets[0][1].weight.device if targets[0][1].weight.device.type != "meta"
                                    else "cpu")
        self.base_model = base_model
        self.adapter_layers: dict[str, AdapterLayer] = {}
        for name, module in targets:
            layer = self.method.create_layer(module, name, config, shared)
            parent_name, _, child = name.rpartition(".")
            setattr(base_model.get_submodule(parent_name), child, layer)
            self.adapter_layers[name] = layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # Counting -----------------------------------------------------------------------------------

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; VeRA's frozen shared pair is a buffer, as in PEFT."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # Training rules ----------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """The method's optimizer parameter groups (LoRA+: B at lr * ratio), for any torch optimizer."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [g for g in self.method.param_groups(named, self.config, lr, weight_decay) if g["params"]]

    def create_optimizer(self, lr: float = 2e-4, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                         weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
        """An optimizer with the method's rules wired in: its groups, and its after-step hook."""
        optimizer = optimizer_cls(self.param_groups(lr, weight_decay), lr=lr, **kwargs)
        self.attach_training_rules(optimizer)
        return optimizer

    def attach_training_rules(self, optimizer: torch.optim.Optimizer) -> None:
        """Make an optimizer you built yourself follow the method (Delta-LoRA's update of W after each step).

        Build it over ``model.param_groups(lr)`` to get LoRA+'s learning rates, then call this once. Several
        optimizers (say one for the A matrices, one for the B) may be attached: one training step is counted,
        and the after-step rule run, when every attached optimizer has stepped once more, so the rule sees all
        factors updated. An optimizer stops counting when it is garbage collected.
        """
        key = id(optimizer)
        if key in self._optimizer_steps:
            return
        self._optimizer_steps[key] = self._rounds
        weakref.finalize(optimizer, self._optimizer_steps.pop, key, None)
        optimizer.register_step_post_hook(self._optimizer_stepped)

    def _optimizer_stepped(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizer_steps[id(optimizer)] += 1
        while self._rounds < min(self._optimizer_steps.values()):
            self._rounds += 1
            self.step_done()

    def step_done(self) -> None:
        """Count one optimizer step and apply the method's after-step rule. Attached optimizers call it."""
        self.steps_done += 1
        self.method.after_step(list(self.adapter_layers.values()), self.config, self.steps_done)

    # Export and folding -------------------------------------------------------------------------

    def lora_factors(self) -> dict[str, LoraFactors]:
        """Exact plain-LoRA factors of every adapted module, keyed by module name."""
        return {name: layer.lora_factors() for name, layer in self.adapter_layers.items()}

    def fold(self) -> None:
        """Fold the adapter into the base weights (fp32, rounded once); the adapter branch is skipped. A layer that
        cannot be folded (``fold_problem``) raises ValueError before any weight changes."""
        for name, layer in self.adapter_layers.items():
            problem = None if layer.folded else layer.fold_problem()
            if problem:
                raise ValueError(f"{name}: {problem}")
        for layer in self.adapter_layers.values():
            layer.fold()

    def unfold(self) -> None:
        """Restore the exact base weights and run the adapter branch again."""
        for layer in self.adapter_layers.values():
            layer.unfold()

    def merge_and_unload(self) -> nn.Module:
        """Fold, remove every adapter layer, and return the plain transformers model."""
        self.fold()
        for name, layer in self.adapter_layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, layer.base_layer)
        self.adapter_layers = {}
        model = self.base_model
        untie_if_changed(model)
        return model

    # Files ---------------------------------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Write the adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors)."""
        save_adapter(self, path)

    save_pretrained = save_adapter

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike,
                        is_trainable: bool = False) -> "FineTuningModel":
        """Load an adapter folder written by us or by PEFT onto ``base_model`` (modified in place)."""
        return load_adapter(base_model, path, is_trainable=is_trainable)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.adapter_layers.values():
            yield from layer.adapter_tensors()


def untie_if_changed(model: nn.Module) -> None:
    """If folding gave the output embedding its own weight, record that the embeddings are no longer tied."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and out is not None and inp.weight is not out.weight:
        config.tie_word_embeddings = False


# Loading onto a model ---------------------------------------------------------------------------

def load_adapter(base_model: torch.nn.Module, path: str | os.PathLike, is_trainable: bool = False,
                 allow_pickle: bool = False) -> FineTuningModel:
    """Inject the folder's adapter into ``base_model`` and load its tensors. On any mismatch the base model
    is left exactly as it was and AdapterFileError lists every problem."""
    folder = read_adapter(path, allow_pickle)
    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
    try:
        model = FineTuningModel(base_model, folder.config, module_names=sorted(folder.modules))
    except ConfigError as exc:
        raise AdapterFileError(f"{folder.path}: does not fit this model: {exc}") from None
    try:
        load_tensors(model, folder)
    except AdapterFileError:
        _restore(model, flags)
        raise
    model.steps_done = int(folder.extra.get("steps_done", 0))
    if not is_trainable:
        for param in model.adapter_parameters():
            param.requires_grad_(False)
        model.eval()
    return model


def load_tensors(model: FineTuningModel, folder: AdapterFolder) -> None:
    problems = []
    for name, layer in model.adapter_layers.items():
        state = folder.modules[name]
        layer.prepare_for_state(set(state))
        expected = {k: tuple(v.shape) for k, v in layer.adapter_state().items()}
        for key, shape in expected.items():
            if key not in state:
                problems.append(f"{name}.{key} is missing")
            elif tuple(state[key].shape) != shape:
                problems.append(f"{name}.{key} has shape {tuple(state[key].shape)}, this model needs {shape}")
        problems += [f"{name}.{key} is not used by {folder.config.method}" for key in set(state) - set(expected)]
        if not problems:
            problems += [f"{name}: {problem}" for problem in layer.state_problems(state)]
    shared = getattr(model, "shared", None)
    if not problems:
        problems += model.method.load_shared(shared, folder.shared, folder.config, check_only=True)
    if problems:
        raise AdapterFileError(f"{folder.path}: adapter does not fit this model: "
                               + "; ".join(problems[:PROBLEMS_LISTED])
                               + (f" (and {len(problems) - PROBLEMS_LISTED} more)" if len(problems) > PROBLEMS_LISTED
                                  else ""))
    for name, layer in model.adapter_layers.items():
        layer.load_adapter_state(folder.modules[name])
    model.method.load_shared(shared, folder.shared, folder.config, check_only=False)


def _restore(model: FineTuningModel, flags: dict[str, bool]) -> None:
    base = model.base_model
    for name, layer in model.adapter_layers.items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    for name, param in base.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))


# Saving -------------------------------------------------------------------------------------------

def save_adapter(model: FineTuningModel, path: str | os.PathLike) -> None:
    """Write ``model``'s adapter in PEFT's layout; files appear whole or not at all."""
    config: FineTuningConfig = model.config
    layers = model.adapter_layers
    fan_in_fan_out = any(layer.is_conv1d for layer in layers.values())
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    method = model.method
    extra = {"config": dataclasses.asdict(config), "steps_done": model.steps_done, **method.save_extra(layers)}
    native = {PREFIX + f"{name}.{key}": t for name, layer in layers.items() for key, t in layer.adapter_state().items()}
    native.update({f"base_model.{key}": t for key, t in method.shared_state(getattr(model, "shared", None), config).items()})
    files: dict[str, dict[str, Tensor]] = {}
    if method.side_file:
        peft_config, files[ADAPTER_WEIGHTS] = plain_lora(model.lora_factors(), config, targets, fan_in_fan_out)
        peft_config[EXTRA_KEY] = {**peft_config[EXTRA_KEY], **extra, "method": config.method}
        files[method.side_file] = native
    else:
        peft_config = config.to_peft_dict(targets, fan_in_fan_out, extra)
        files[ADAPTER_WEIGHTS] = native
    write_adapter_folder(path, peft_config, files)
