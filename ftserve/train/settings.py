"""The settings of ``ftserve train``: flags, a YAML file holding the same names (flags override it), checked
before anything is loaded.

A YAML file uses the flags' long names with ``_`` for ``-``::

    method: lora+
    rank: 16
    settings: {loraplus_lr_ratio: 8}     # the method's own settings (--setting KEY=VALUE)
    lr: 2.0e-4
    epochs: 3
    max_seq_len: 512
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FineTuningConfig
from ..errors import ConfigError
from ..methods.base import check_int, check_number

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


@dataclass
class TrainSettings:
    """Everything one ``ftserve train`` run needs. ``settings`` holds the chosen method's own settings."""

    base: str = ""
    data: str = ""
    output: str = ""
    # The adapter
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None  # None: twice the rank
    dropout: float = 0.0
    targets: list[str] | str | None = None  # None: the model type's defaults; "all-linear"; names; a regex
    rslora: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    load_in_4bit: bool = False
    # Data
    eval_data: str | None = None
    eval_fraction: float = 0.0
    max_seq_len: int = 1024
    packing: bool = False
    chat_template: str | None = None
    # Training, with transformers' meanings
    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = None  # None: at the end of each epoch when there is eval data
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: str | None = None  # "latest" (the run's last complete checkpoint) or a checkpoint folder
    force: bool = False
    # After training
    deploy_to: str | None = None
    api_key: str | None = None
    adapter_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("base", "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} is required: give it on the command line or as {name}: in --config")
        for name, minimum in (("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("max_seq_len", 2),
                              ("logging_steps", 1), ("save_steps", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        check_int("max_steps", self.max_steps, -1)
        if self.eval_steps is not None:
            check_int("eval_steps", self.eval_steps, 1)
        for name in ("lr", "epochs"):
            check_number(name, getattr(self, name), positive=True)
        for name in ("warmup_ratio", "weight_decay", "dropout", "eval_fraction"):
            check_number(name, getattr(self, name))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1]; got {self.warmup_ratio}")
        if self.eval_data and self.eval_fraction:
            raise ConfigError("give --eval-data or --eval-fraction, not both")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"lr_scheduler {self.lr_scheduler!r} is not one of {list(SCHEDULERS)}")
        if not isinstance(self.settings, dict):
            raise ConfigError(f"settings must be a mapping of the method's setting -> value; got {self.settings!r}")
        if self.api_key and not self.deploy_to:
            raise ConfigError("--api-key is for --deploy-to; give the server's URL too")

    @classmethod
    def from_sources(cls, config_file: str | Path | None, flags: dict[str, Any]) -> "TrainSettings":
        """The YAML file's values, then every flag that was given (not None) on top."""
        values = read_yaml(config_file) if config_file else {}
        given = {k: v for k, v in flags.items() if v is not None and v != () and v != {}}
        if "settings" in given:
            given["settings"] = {**values.get("settings", {}), **given["settings"]}
        return cls(**{**values, **given})

    def adapter_config(self) -> FineTuningConfig:
        """The FineTuningConfig of the run; a setting the chosen method does not have is an error."""
        chosen = FineTuningConfig(method=self.method).adapter_method
        unknown = sorted(set(self.settings) - set(chosen.option_defaults))
        if unknown:
            raise ConfigError(f"{chosen.title or chosen.name} has no setting {', '.join(map(repr, unknown))}; its "
                              f"settings: {sorted(chosen.option_defaults) or 'none'}")
        return FineTuningConfig(
            method=self.method, lora_r=self.rank, lora_alpha=self.alpha if self.alpha is not None else 2 * self.rank,
            lora_dropout=self.dropout, target_modules=self.targets, use_rslora=self.rslora,
            base_model_name_or_path=self.base, method_options=dict(self.settings),
        )

    def as_dict(self) -> dict[str, Any]:
        """What the model card records (the API key left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "api_key"}


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting {', '.join(map(repr, unknown))}; the settings are the flags' "
                          f"long names with _ for -, e.g. max_seq_len")
    return values


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (``4``, ``0.5``, ``true``, ``[a, b]``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--setting takes KEY=VALUE; got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value
