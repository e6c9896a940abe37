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
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .methods import METHODS as _REGISTRY
from .methods import AdapterMethod, method_for_peft_type, method_for_spelling, variant_refusal
from .methods.base import check_int as _check_int
from .methods.base import check_number as _check_number


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registry's names, read when asked, so a registered method shows up
        return tuple(_REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Key of our own settings (method, hyperparameters) in to_peft_dict's result. Saving moves them to a file of their
# own beside adapter_config.json (PEFT warns about any key it does not know).
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


@dataclass(init=False)
class FineTuningConfig:
    """What to adapt and how. Defaults follow the papers (see adapters_spec/).

    The fields below are every method's. A method's own settings (LoRA+'s ``loraplus_lr_ratio``, VeRA's
    ``projection_prng_key``, ``d_initial``, ``save_projection``, Delta-LoRA's ``delta_update_ratio``,
    ``delta_start_step``, or a registered method's) are declared, defaulted and checked by the method's file
    in ftserve/methods/ (``AdapterMethod.option_defaults`` and ``validate``), given as keyword arguments or
    in ``method_options``, kept in ``method_options`` and read as attributes: ``config.delta_start_step``.
    A setting of another method than the chosen one is refused: it would have no effect.
    """

    method: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str] | str | None
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    method_options: dict[str, Any]

    def __init__(self, method: str = "lora", lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 target_modules: list[str] | str | None = None, use_rslora: bool = False,
                 rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                 base_model_name_or_path: str | None = None, method_options: dict[str, Any] | None = None,
                 **settings: Any) -> None:
        self.method = canonical_method(method)
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.target_modules, self.use_rslora = target_modules, use_rslora
        self.rank_pattern = {} if rank_pattern is None else rank_pattern
        self.alpha_pattern = {} if alpha_pattern is None else alpha_pattern
        self.base_model_name_or_path = base_model_name_or_path
        if method_options is not None and not isinstance(method_options, dict):
            raise ConfigError(f"method_options must be a dict of setting -> value; got {method_options!r}")
        options = {**(method_options or {}), **settings}
        chosen = self.adapter_method
        _refuse_foreign(options, chosen)
        self.method_options = {**chosen.option_defaults, **options}
        self._check()
        chosen.validate(self)

    def _check(self) -> None:
        _check_int("lora_r", self.lora_r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, positive=True)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        self.target_modules = _check_targets(self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be True or False; got {self.use_rslora!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, name)
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

    def __getattr__(self, name: str) -> Any:
        """A method's own setting, ``config.loraplus_lr_ratio``: called only for names that are not fields."""
        options = self.__dict__.get("method_options")
        if options is not None and name in options:
            return options[name]
        owner = _owner_of(name)
        if owner is not None and options is not None:
            raise AttributeError(f"{name} is a setting of {owner.name}; this config's method is {self.method}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _FIELDS and name in self.__dict__.get("method_options", ()):
            self.method_options[name] = value
        else:
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FineTuningConfig":
        """A config from ``dataclasses.asdict`` of one. Back-compatibility: an older ftserve wrote every built-in
        method's settings as fields; those of other methods than the chosen one are dropped, unread."""
        chosen = _REGISTRY[canonical_method(data.get("method", "lora"))]
        kept = {key: value for key, value in data.items() if key in _FIELDS or key in chosen.option_defaults}
        return cls(**kept)

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
        """A copy with ``changes`` (fields or settings). A new ``method`` keeps only the settings it has."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        method = _REGISTRY[canonical_method(changes.get("method", self.method))]
        fields["method_options"] = {key: value for key, value in self.method_options.items()
                                    if key in method.option_defaults}
        return type(self)(**{**fields, **changes})

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
        """Read an adapter_config.json written by PEFT or by us (our settings under EXTRA_KEY, where the folder
        reader puts them)."""
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
        if data.get("modules_to_save"):
            raise ConfigError(f"adapters with modules_to_save={data['modules_to_save']} are not supported")
        method = method_for_peft_type(peft_type, ours.get("method"), data)
        if method is None:
            types = sorted({m.peft_type for m in _REGISTRY.values()})
            if peft_type in types:  # a variant field set that no method of this type carries
                method = next(m for m in _REGISTRY.values() if m.peft_type == peft_type)
            else:
                raise ConfigError(f"peft_type {peft_type!r} is not supported; expected one of {types}")
        refusal = variant_refusal(data, method)
        if refusal:
            raise ConfigError(refusal)
        kwargs.update(method=method.name, **method.from_peft(data, ours))
        return cls(**kwargs)


_FIELDS = frozenset(f.name for f in dataclasses.fields(FineTuningConfig))


def _owner_of(setting: str) -> AdapterMethod | None:
    return next((m for m in _REGISTRY.values() if setting in m.option_defaults), None)


def _refuse_foreign(options: dict[str, Any], chosen: AdapterMethod) -> None:
    """A ConfigError for settings the chosen method does not have, naming whose they are."""
    for key in options:
        if key in chosen.option_defaults:
            continue
        owner = _owner_of(key)
        whose = f"a setting of {owner.name}, not of {chosen.name}" if owner else "not a setting of any method"
        raise ConfigError(f"{key} is {whose}; {chosen.name}'s settings are {sorted(chosen.option_defaults) or 'none'}"
                          f" (and FineTuningConfig's fields {sorted(_FIELDS - {'method_options'})})")


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
