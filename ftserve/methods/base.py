"""What every adapter method provides, and the layer wrapper they share.

Shapes follow PEFT's storage: base ``W (d_out x d_in)``, ``A (r x d_in)``, ``B (d_out x r)``.
GPT-2's ``Conv1D`` stores ``W`` transposed ``(d_in x d_out)``; the adapter math is the same and only
folding transposes.

Every method hands the engines, the fold and the merge one served form, ``LoraFactors`` (factors.py), in one of
two forms:

* plain: ``W' = W + s B A``, an exact plain LoRA (LoRA, LoRA+, LoRA-FA, VeRA, Delta-LoRA);
* row-scaled: ``W' = diag(m / ||W + s B A||_row) (W + s B A)`` (DoRA's), which reads the base weight and
  scales the base output per row; a method declares it with ``AdapterMethod.row_scaled``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .factors import LoraFactors


PEFT_DEFAULT_RANK, PEFT_DEFAULT_ALPHA = 8, 8  # LoraConfig's r and lora_alpha, for a folder that omits them


class FineTuningConfig(Protocol):
    """What a method reads of ftserve.config.FineTuningConfig, which sits above the registry and asks it."""

    method: str
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    method_options: dict[str, Any]

    def rank_for(self, module_name: str) -> int: ...

    def scale_for(self, module_name: str) -> float: ...


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0; got {value!r}")


def normalised_spelling(name: str) -> str:
    """`"LoRA-Plus"` -> `"lora+"`, `"delta_lora"` -> `"deltalora"`: lower case, no spaces, `_` or `-`."""
    return re.sub(r"[\s_\-]", "", name.strip().lower()).replace("plus", "+")


def targetable_types() -> tuple[type, ...]:
    """nn.Linear and GPT-2's Conv1D; transformers is imported on first use (it costs seconds)."""
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def __getattr__(name: str):
    if name == "TARGETABLE":
        return targetable_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_low_rank(out: Tensor, u: Tensor, B: Tensor, scale: float) -> Tensor:
    """``out + scale * u B^T`` as one ``addmm``: no pass over the activations for the scale or the add.

    ``addmm`` applies ``alpha`` to the product, as ``(u B^T) * scale`` does, and scales only the small
    r-dim gradients in backward. Falls back to the plain sum where the dtypes differ.
    """
    if out.dtype != u.dtype or u.dtype != B.dtype:
        return out + (F.linear(u, B) * scale).to(out.dtype)
    return torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, u.shape[-1]), B.t(),
                       alpha=scale).view(out.shape)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an nn.Linear or a Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    d_in, d_out = layer.weight.shape  # Conv1D stores (d_in, d_out)
    return d_out, d_in


class AdapterLayer(nn.Module):
    """Wraps a frozen linear layer in place: ``h = base(x) + delta(x)``.

    Subclasses add their tensors in ``__init__`` and define ``delta`` (the forward term),
    ``lora_factors`` (the served form: plain LoRA, or row-scaled with a magnitude), ``adapter_state`` /
    ``load_adapter_state`` (the tensors saved per module, keyed by PEFT's suffixes). ``delta_weight``,
    ``fold`` and ``unfold`` are derived from ``lora_factors`` and the base weight.

    A row-scaled method scales the base output too, so it overrides ``add_delta(out, x)`` (``out`` is
    ``base(x)``, bias included) to return ``r * (out - bias + s B A x) + bias``; ``delta`` alone cannot.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.folded = False
        self.enabled = True
        self._weight_before_fold: Tensor | None = None

    @property
    def weight_device(self) -> torch.device:
        device = self.base_layer.weight.device
        return torch.device("cpu") if device.type == "meta" else device

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.folded or not self.enabled:
            return out
        return self.add_delta(out, x)

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + delta(x)``; a method may override it to fuse the add into its last product."""
        return out + self.delta(x.to(self.adapter_dtype)).to(out.dtype)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(p for p in self.adapter_tensors()).dtype

    def adapter_tensors(self):
        return (t for name, t in self.named_parameters() if not name.startswith("base_layer."))

    def delta(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def lora_factors(self) -> LoraFactors:
        raise NotImplementedError

    def adapter_state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def state_problems(self, state: dict[str, Tensor]) -> list[str]:
        """What makes a saved state of the right shapes unusable on this layer (sentences); checked before any
        tensor is loaded. Default: nothing."""
        return []

    def fold_problem(self) -> str | None:
        """Why this layer cannot be folded, in one line, or None: a row-scaled form whose row scale is not finite
        on this base weight (a zero-norm row of ``W + s B A``)."""
        factors = self.lora_factors()
        return factors.row_scale_problem(self.base_weight()) if factors.row_scaled else None

    def prepare_for_state(self, keys: set[str]) -> None:
        """Make room for the tensors a saved state holds (Delta-LoRA's start snapshot) before loading it."""

    def base_weight(self) -> Tensor:
        """The base weight W in fp32, PEFT's orientation (d_out, d_in): Conv1D's is transposed."""
        weight = self.base_layer.weight.float()
        return weight.T if self.is_conv1d else weight

    def delta_weight(self) -> Tensor:
        """Dense fp32 ``W' - W`` in PEFT's orientation (d_out, d_in); the row-scaled form reads the base weight."""
        factors = self.lora_factors()
        return factors.delta_weight(self.base_weight() if factors.row_scaled else None)

    # Folding: into the weights in memory, in fp32, rounded once into the weight's dtype: ``W' = W + s B A``,
    # or ``diag(r) (W + s B A)`` for the row-scaled form (LoraFactors); the bias is never touched. The folded
    # weight is a new tensor, so a weight tied to another module (lm_head and the embeddings) is untied, not
    # changed under the other module; unfolding puts the original parameter back, exactly.

    @torch.no_grad()
    def fold(self) -> None:
        if self.folded:
            return
        weight = self.base_layer.weight
        folded = self.lora_factors().folded_weight(self.base_weight())
        self._weight_before_fold = weight
        folded = (folded.T if self.is_conv1d else folded).to(weight.dtype).contiguous()
        self.base_layer.weight = nn.Parameter(folded, requires_grad=False)
        self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        if not self.folded:
            return
        self.base_layer.weight = self._weight_before_fold
        self._weight_before_fold = None
        self.folded = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, folded={self.folded}"


class AdapterMethod:
    """A method's registry entry: everything about it that is not the layer's own math.

    How it builds layers, trains and exports from saved tensors; its name and spellings; its own config
    fields, their checks and their place in adapter_config.json; the files and shared tensors it saves.
    The defaults suit a method stored as PEFT's LoRA that adds no shared tensors, trains every adapter
    tensor at one learning rate and needs nothing after an optimizer step. See ftserve/methods/lora.py.
    """

    name: str = ""
    title: str = ""  # as the paper writes it, for messages: "Delta-LoRA"
    peft_type: str = "LORA"
    spellings: tuple[str, ...] = ()  # normalised spellings besides the name's own (see normalised_spelling)
    saved_keys: tuple[str, ...] = ()  # per-module tensor names on disk, after "<module>."
    snapshot_keys: tuple[str, ...] = ()  # saved_keys that are a frozen copy, not trained parameters
    # The method's own settings and their defaults: FineTuningConfig keyword arguments, kept in its
    # method_options, read as config.<name>, saved under the "ftserve" key; ``validate`` checks them.
    option_defaults: dict[str, Any] = {}
    shared_keys: tuple[str, ...] = ()  # shared tensors on disk, as "base_model.<key>"
    side_file: str | None = None  # a file holding the exact training state, the weights file being plain LoRA
    # True: the served form is row-scaled (LoraFactors.magnitude set, DoRA's form): folded, merged and served on
    # the torch engine, but neither exported as a plain LoRA nor served by vLLM.
    row_scaled: bool = False
    # The boolean adapter_config.json field that marks this method's folders among those of its peft_type (DoRA's
    # "use_dora"); None: a folder of this method sets no such field.
    peft_variant: str | None = None
    has_scale: bool = True  # False: no alpha / r (VeRA)
    quickstart_settings: dict[str, float] = {"rank": 8, "lr": 1e-2, "real_lr": 3e-3}  # real_lr: on SmolLM2

    # Config ------------------------------------------------------------------------------------

    def validate(self, config: FineTuningConfig) -> None:
        """Check this method's settings (``config.method_options``, unknown names already refused) and the
        rules that apply when it is chosen; may adjust the config (with a warning). Raise ConfigError."""

    def peft_fields(self, config: FineTuningConfig) -> dict[str, Any]:
        """adapter_config.json fields PEFT reads for this method (besides the ones every adapter has)."""
        return {
            "peft_type": self.peft_type, "r": config.lora_r, "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora,
            "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
            "bias": "none", "init_lora_weights": True, "use_dora": False, "lora_bias": False,
        } | ({self.peft_variant: True} if self.peft_variant else {})

    def ftserve_fields(self, config: FineTuningConfig) -> dict[str, Any]:
        """Our own settings PEFT does not see, written under the "ftserve" key."""
        return dict(config.method_options)

    def from_peft(self, data: dict, ours: dict) -> dict[str, Any]:
        """FineTuningConfig keyword arguments from an adapter_config.json (``ours``: its "ftserve" key)."""
        kwargs = dict(
            lora_r=data.get("r", PEFT_DEFAULT_RANK), lora_alpha=data.get("lora_alpha", PEFT_DEFAULT_ALPHA),
            lora_dropout=data.get("lora_dropout", 0.0) or 0.0, use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=data.get("rank_pattern") or {}, alpha_pattern=data.get("alpha_pattern") or {},
        )
        return {**kwargs, **self.settings_from(ours)}

    def settings_from(self, ours: dict) -> dict[str, Any]:
        """This method's settings as saved under the "ftserve" key. Back-compatibility: an older ftserve nested
        some of them under "method_options"."""
        saved = {**(ours.get("method_options") or {}), **ours}
        return {key: saved[key] for key in self.option_defaults if key in saved}

    def describe(self, config: FineTuningConfig) -> dict[str, Any]:
        """`ftserve inspect`'s alpha and scale lines for this method."""
        return {"alpha": config.lora_alpha,
                "scale": f"alpha/{'sqrt(r)' if config.use_rslora else 'r'} = {config.scale_for(''):g}"}

    # Layers and training -----------------------------------------------------------------------

    def trainable_parameters(self, config: FineTuningConfig, shapes: dict[str, tuple[int, int]]) -> int:
        """Trainable parameters the adapter adds to modules of these ``(d_out, d_in)``, by module name, in
        closed form: LoRA's ``sum r (d_in + d_out)``, each module at its own rank."""
        return sum(config.rank_for(name) * (d_in + d_out) for name, (d_out, d_in) in shapes.items())

    def frozen_parameters(self, config: FineTuningConfig, shapes: dict[str, tuple[int, int]]) -> int:
        """Parameters the adapter adds that never train (LoRA-FA's A), in closed form; a shared tensor held
        as a buffer (VeRA's pair) is not a parameter."""
        return 0


    def create_layer(self, base_layer: nn.Module, module_name: str, config: FineTuningConfig,
                     shared: nn.Module | None) -> AdapterLayer:
        raise NotImplementedError

    def create_shared(self, config: FineTuningConfig, shapes: list[tuple[int, int]]) -> nn.Module | None:
        """Tensors shared by all layers (VeRA's frozen pair), built from the (d_out, d_in) of every target."""
        return None

    def param_groups(self, named_params: list[tuple[str, nn.Parameter]], config: FineTuningConfig,
                     lr: float, weight_decay: float) -> list[dict]:
        params = [p for _, p in named_params if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def after_step(self, layers: list[AdapterLayer], config: FineTuningConfig, steps_done: int) -> None:
        """Called after every optimizer step with the number of steps done so far."""

    # Saved tensors -----------------------------------------------------------------------------

    def shared_state(self, shared: nn.Module | None, config: FineTuningConfig) -> dict[str, Tensor]:
        """Shared tensors to save, keyed as in ``shared_keys``."""
        return {}

    def load_shared(self, shared: nn.Module | None, tensors: dict[str, Tensor], config: FineTuningConfig,
                    check_only: bool) -> list[str]:
        """Check saved shared tensors against the model's (problems, as sentences); load them unless check_only."""
        return [f"base_model.{key} is not used by {self.name}" for key in tensors]

    def save_extra(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """What export needs beyond the tensors (VeRA: each layer's input size), kept under the "ftserve" key."""
        return {}

    def export_shared(self, config: FineTuningConfig, modules: dict[str, dict[str, Tensor]],
                      shared: dict[str, Tensor], in_features: dict[str, int]) -> dict[str, Tensor]:
        """The shared tensors ``export_factors`` needs (VeRA rebuilds an unsaved pair); ValueError if it cannot."""
        return shared

    def state_shape(self, state: dict[str, Tensor]) -> tuple[int, int | None, int]:
        """(d_out, d_in, rank) of one module's saved tensors; d_in None where they do not show it."""
        d_out, r = state["lora_B.weight"].shape
        return d_out, state["lora_A.weight"].shape[1], r

    def export_factors(self, state: dict[str, Tensor], shared: dict[str, Tensor], config: FineTuningConfig,
                       module_name: str, in_features: int | None) -> LoraFactors:
        """The served form (``lora_factors``'s) from one module's saved tensors, without a model: exact
        plain-LoRA factors, with the magnitude for a row-scaled method."""
        raise NotImplementedError
