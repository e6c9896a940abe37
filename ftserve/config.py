"""FineTuningConfig: which adapter method, where, and with what hyperparameters.

It validates everything at construction, resolves per-module rank and alpha the way PEFT does
(`rank_pattern` / `alpha_pattern`), and maps itself to and from PEFT's `adapter_config.json`. What is
particular to one method (its spellings, the checks of its fields, its PEFT fields) the registry in
ftserve/methods/ answers; this module never branches on a method's name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .methods import METHODS as _REGISTRY
from .methods import AdapterMethod, method_for_peft_type, method_for_spelling
from .methods.base import check_int as _check_int
from .methods.base import check_number as _check_number


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registry's names, read when asked, so a registered method shows up
        return tuple(_REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Key of our own settings (method, hyperparameters) in to_peft_dict's result. Saving moves them to a file of their
# own beside adapter_config.json (PEFT warns about any key it does not know); folders written before that keep
# them under this key in adapter_config.json, and from_peft_dict still reads them there.
EXTRA_KEY = "ftserve"


def canonical_method(name: str) -> str:
    """`"LoRA-Plus"`, `"loraplus"`, `"delta_lora"` ... -> one of METHODS."""
    if not isinstance(name, str):
        raise ConfigError(f"method must be a string, one of {list(_REGISTRY)}; got {name!r}")
    method = method_for_spelling(name)
    if method is None:
        raise ConfigError(f"unknown method {name!r}; expected one of {list(_REGISTRY)}")
    return method.name


def pattern_lookup(patterns: dict[str, Any], module_name: str) -> Any | None:
    """PEFT's rule: a key matches a module whose name ends with it on a '.' boundary (key is a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return None


@dataclass
class FineTuningConfig:
    """What to adapt and how. Defaults follow the papers (see adapters_spec/)."""

    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # The built-in methods' own fields; each method's file in ftserve/methods/ checks and saves its own.
    # LoRA+ (arXiv:2402.12354): learning rate of B = ratio x learning rate of A.
    loraplus_lr_ratio: float = 16.0
    # VeRA (arXiv:2310.11454): seed of the shared frozen pair, initial value of d, save the pair.
    projection_prng_key: int = 0
    d_initial: float = 0.1
    save_projection: bool = True
    # Delta-LoRA (arXiv:2309.02411): W moves by ratio * s * (B'A' - BA) after each step past start.
    delta_update_ratio: float = 2.0
    delta_start_step: int = 500
    base_model_name_or_path: str | None = None
    # Settings of a method that has no field here (one registered from outside the package); its
    # AdapterMethod.option_defaults fill the ones not given.
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        _check_int("lora_r", self.lora_r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, positive=True)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        self.target_modules = _check_targets(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be True or False; got {self.use_rslora!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, name) or {}
            if not isinstance(patterns, dict):
                raise ConfigError(f"{name} must be a dict of module-name pattern -> value; got {patterns!r}")
            for key, value in patterns.items():
                _check_number(f"{name}[{key!r}]", value, positive=True)
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(f"{name} key {key!r} is not a valid regex: {exc}") from None
            setattr(self, name, dict(patterns))
        for key, value in self.rank_pattern.items():
            _check_int(f"rank_pattern[{key!r}]", value, minimum=1)
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a dict of setting -> value; got {self.method_options!r}")
        for method in _REGISTRY.values():
            method.validate_fields(self)
        chosen = self.adapter_method
        self.method_options = {**chosen.option_defaults, **self.method_options}
        chosen.validate(self)

    @property
    def adapter_method(self) -> AdapterMethod:
        """The registry's entry for ``method``."""
        return _REGISTRY[self.method]

    # Per-module values -------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        found = pattern_lookup(self.rank_pattern, module_name)
        return int(found) if found is not None else self.lora_r

    def alpha_for(self, module_name: str) -> float:
        found = pattern_lookup(self.alpha_pattern, module_name)
        return float(found) if found is not None else float(self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv:2312.03732). VeRA has no scale."""
        if not self.adapter_method.has_scale:
            return 1.0
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> "FineTuningConfig":
        return dataclasses.replace(self, **changes)

    # PEFT adapter_config.json -------------------------------------------------------------------

    def to_peft_dict(self, resolved_targets: list[str], fan_in_fan_out: bool, extra: dict | None = None) -> dict:
        """The adapter_config.json PEFT writes for this adapter, plus our own settings under EXTRA_KEY (which
        the adapter folder writer moves to a file of their own)."""
        targets = self.target_modules if isinstance(self.target_modules, str) and self.target_modules != "all-linear" \
            else sorted(resolved_targets)
        common = {
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "target_modules": targets,
            "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        method = self.adapter_method
        ours = {"method": self.method, "version": _version(), **method.ftserve_fields(self)}
        body = method.peft_fields(self)
        if body.get("peft_type") == "LORA":  # PEFT's other configs (VeRA's) lack it and warn about it
            common["exclude_modules"] = None
        ours.update(extra or {})
        return dict(sorted({**common, **body, EXTRA_KEY: ours}.items()))

    @classmethod
    def from_peft_dict(cls, data: dict) -> "FineTuningConfig":
        """Read an adapter_config.json written by PEFT or by us (our settings under EXTRA_KEY, as older folders
        keep them in the file and as the folder reader passes them from their own file)."""
        if not isinstance(data, dict) or "peft_type" not in data:
            raise ConfigError("adapter_config.json has no 'peft_type'; is this a PEFT adapter folder?")
        peft_type = str(data["peft_type"]).upper()
        ours = data.get(EXTRA_KEY) or {}
        kwargs: dict[str, Any] = {
            "target_modules": data.get("target_modules"),
            "base_model_name_or_path": data.get("base_model_name_or_path"),
        }
        if data.get("bias", "none") != "none":
            raise ConfigError(f"adapters with bias={data['bias']!r} are not supported; only bias='none'")
        if data.get("use_dora"):
            raise ConfigError("DoRA adapters (use_dora=true) are not supported")
        if data.get("modules_to_save"):
            raise ConfigError(f"adapters with modules_to_save={data['modules_to_save']} are not supported")
        method = method_for_peft_type(peft_type, ours.get("method"))
        if method is None:
            types = sorted({m.peft_type for m in _REGISTRY.values()})
            raise ConfigError(f"peft_type {peft_type!r} is not supported; expected one of {types}")
        kwargs.update(method=method.name, **method.from_peft(data, ours))
        return cls(**kwargs)


def _version() -> str:
    from .version import __version__

    return __version__


def _check_targets(targets: Any) -> list[str] | str | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        if not targets.strip():
            raise ConfigError("target_modules is an empty string; give module names, a regex, or 'all-linear'")
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                raise ConfigError(f"target_modules regex {targets!r} is invalid: {exc}") from None
        return targets
    if isinstance(targets, (list, tuple, set)) and targets and all(isinstance(t, str) and t for t in targets):
        return sorted(set(targets)) if isinstance(targets, set) else list(targets)
    raise ConfigError(
        f"target_modules must be a list of module names (e.g. ['q_proj', 'v_proj']), a regex, or 'all-linear'; "
        f"got {targets!r}"
    )
