"""FineTuningConfig: which adapter method, where, and with what hyperparameters.

It validates everything at construction, resolves per-module rank and alpha the way PEFT does
(`rank_pattern` / `alpha_pattern`), and maps itself to and from PEFT's `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

METHODS = ("lora", "vera", "lora+", "delta-lora", "lora-fa")

_SPELLINGS = {"lora": "lora", "vera": "vera", "lora+": "lora+", "deltalora": "delta-lora", "lorafa": "lora-fa"}

# Key under which methods that PEFT has no type for, and our own hyperparameters, live in
# adapter_config.json. PEFT and vLLM ignore unknown keys.
EXTRA_KEY = "ftserve"


def canonical_method(name: str) -> str:
    """`"LoRA-Plus"`, `"loraplus"`, `"delta_lora"` ... -> one of METHODS."""
    if not isinstance(name, str):
        raise ConfigError(f"method must be a string, one of {list(METHODS)}; got {name!r}")
    key = re.sub(r"[\s_\-]", "", name.strip().lower()).replace("plus", "+")
    method = _SPELLINGS.get(key)
    if method is None:
        raise ConfigError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return method


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
        _check_number("loraplus_lr_ratio", self.loraplus_lr_ratio, positive=True)
        _check_int("projection_prng_key", self.projection_prng_key, minimum=0)
        _check_number("d_initial", self.d_initial)
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"save_projection must be True or False; got {self.save_projection!r}")
        _check_number("delta_update_ratio", self.delta_update_ratio)
        if self.delta_update_ratio < 0:
            raise ConfigError(f"delta_update_ratio must be >= 0; got {self.delta_update_ratio}")
        _check_int("delta_start_step", self.delta_start_step, minimum=0)
        if self.method == "delta-lora" and self.lora_dropout > 0:
            warnings.warn(f"Delta-LoRA removes dropout from the low-rank branch, as the paper does; "
                          f"lora_dropout={self.lora_dropout} is set to 0", stacklevel=3)
            self.lora_dropout = 0.0
        if self.method == "vera" and (self.rank_pattern or self.alpha_pattern):
            raise ConfigError("VeRA shares one rank across layers: rank_pattern/alpha_pattern are not allowed")

    # Per-module values -------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        found = pattern_lookup(self.rank_pattern, module_name)
        return int(found) if found is not None else self.lora_r

    def alpha_for(self, module_name: str) -> float:
        found = pattern_lookup(self.alpha_pattern, module_name)
        return float(found) if found is not None else float(self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv:2312.03732). VeRA has no scale."""
        if self.method == "vera":
            return 1.0
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> "FineTuningConfig":
        return dataclasses.replace(self, **changes)

    # PEFT adapter_config.json -------------------------------------------------------------------

    def to_peft_dict(self, resolved_targets: list[str], fan_in_fan_out: bool, extra: dict | None = None) -> dict:
        """The adapter_config.json PEFT writes for this adapter; our own settings under EXTRA_KEY."""
        targets = self.target_modules if isinstance(self.target_modules, str) and self.target_modules != "all-linear" \
            else sorted(resolved_targets)
        common = {
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "target_modules": targets,
            "exclude_modules": None,
            "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
        ours = {"method": self.method, "version": _version()}
        if self.method == "vera":
            body = {
                "peft_type": "VERA",
                "r": self.lora_r,
                "vera_dropout": self.lora_dropout,
                "d_initial": self.d_initial,
                "projection_prng_key": self.projection_prng_key,
                "save_projection": self.save_projection,
                "bias": "none",
                "init_weights": True,
            }
        else:
            body = {
                "peft_type": "LORA",
                "r": self.lora_r,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "use_rslora": self.use_rslora,
                "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "bias": "none",
                "init_lora_weights": True,
                "use_dora": False,
                "lora_bias": False,
            }
            if self.method == "lora+":
                ours["loraplus_lr_ratio"] = self.loraplus_lr_ratio
            if self.method == "delta-lora":
                ours["delta_update_ratio"] = self.delta_update_ratio
                ours["delta_start_step"] = self.delta_start_step
        ours.update(extra or {})
        return dict(sorted({**common, **body, EXTRA_KEY: ours}.items()))

    @classmethod
    def from_peft_dict(cls, data: dict) -> "FineTuningConfig":
        """Read an adapter_config.json written by PEFT or by us."""
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
        if peft_type == "LORA":
            kwargs.update(
                method=ours.get("method", "lora"),
                lora_r=data.get("r", 8),
                lora_alpha=data.get("lora_alpha", 8),
                lora_dropout=data.get("lora_dropout", 0.0) or 0.0,
                use_rslora=bool(data.get("use_rslora", False)),
                rank_pattern=data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {},
            )
            for key in ("loraplus_lr_ratio", "delta_update_ratio", "delta_start_step"):
                if key in ours:
                    kwargs[key] = ours[key]
        elif peft_type == "VERA":
            kwargs.update(
                method="vera",
                lora_r=data.get("r", 256),
                lora_dropout=data.get("vera_dropout", 0.0) or 0.0,
                d_initial=data.get("d_initial", 0.1),
                projection_prng_key=data.get("projection_prng_key", 0),
                save_projection=bool(data.get("save_projection", True)),
            )
        else:
            raise ConfigError(f"peft_type {peft_type!r} is not supported; expected 'LORA' or 'VERA'")
        return cls(**kwargs)


def _version() -> str:
    from .version import __version__

    return __version__


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0; got {value!r}")


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
