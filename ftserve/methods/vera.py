"""VeRA (Kopiczko, Blankevoort, Asano 2023, arXiv:2310.11454).

One frozen random **pair** ``A (r x max_in)``, ``B (max_out x r)`` is shared by every adapted layer; each layer
trains two vectors only, ``d (r)`` and ``b (d_out)``:

    h = W x + b * (B_l (d * (A_l dropout(x))))        A_l = A[:, :d_in], B_l = B[:d_out, :]

The pair is Kaiming-uniform from a CPU generator seeded with ``projection_prng_key`` (A drawn first), sized to
the largest targeted layer and sliced per layer, as PEFT does, so the same seed gives PEFT's matrices. Because
the slices depend on which layers are targeted, the pair is saved with the adapter. ``b`` starts at zero,
``d`` at ``d_initial``. There is no alpha/r scale. Dense delta ``diag(b) B_l diag(d) A_l``; exact plain-LoRA
export at rank r: ``A' = diag(d) A_l``, ``B' = diag(b) B_l``, s = 1. A_l is frozen, so ``A_l dropout(x)`` is
``frozen_projection``: backward keeps neither x nor a dropout mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdapterFileError, ConfigError
from .base import AdapterLayer, AdapterMethod, LoraFactors, check_int, check_number
from .frozen_projection import frozen_projection


PEFT_DEFAULT_RANK = 256  # VeraConfig's r, for a folder that does not record one
KAIMING_GAIN = math.sqrt(2.0)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-b, b) with ``b = sqrt(3) * gain / sqrt(fan_in)``, fan_in = ``shape[1]``, gain sqrt(2): PEFT's VeRA
    initialisation, drawn from ``generator``, so that one seed gives PEFT's pair."""
    bound = math.sqrt(3.0) * KAIMING_GAIN / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The shared frozen pair, plus contiguous per-shape slices cached per device and dtype."""

    def __init__(self, r: int, max_out: int, max_in: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator))
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator))
        self._slices: dict[tuple, tuple[Tensor, Tensor]] = {}

    def slices(self, d_out: int, d_in: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (d_out, d_in, device, dtype, self.vera_A.data_ptr(), self.vera_A._version)
        if key not in self._slices:
            self._slices = {k: v for k, v in self._slices.items() if k[4:] == key[4:]}
            self._slices[key] = (self.vera_A[:, :d_in].to(device, dtype).contiguous(),
                                 self.vera_B[:d_out].to(device, dtype).contiguous())
        return self._slices[key]

    @torch.no_grad()
    def load(self, vera_A: Tensor, vera_B: Tensor) -> None:
        self.vera_A.copy_(vera_A)
        self.vera_B.copy_(vera_B)


class _AddScaledUp(torch.autograd.Function):
    """``out + b * (v B^T)`` with B frozen, the add fused; ``dL/dv = g (diag(b) B)`` scales the small B rather
    than the activations. Keeps ``B v`` for ``dL/db``, as autograd would."""

    @staticmethod
    def forward(ctx, out: Tensor, v: Tensor, B: Tensor, b: Tensor) -> Tensor:
        Bv = F.linear(v, B)
        ctx.save_for_backward(Bv, B, b)
        return torch.addcmul(out, Bv, b)

    @staticmethod
    def backward(ctx, grad: Tensor):
        Bv, B, b = ctx.saved_tensors
        grad_v = grad @ (B * b[:, None]) if ctx.needs_input_grad[1] else None
        grad_b = (grad * Bv).reshape(-1, b.shape[0]).sum(0) if ctx.needs_input_grad[3] else None
        return grad, grad_v, None, grad_b


class VeraLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, shared: VeraProjection, r: int, dropout: float,
                 d_initial: float) -> None:
        super().__init__(base_layer)
        if shared.vera_A.shape[1] < self.in_features or shared.vera_B.shape[0] < self.out_features:
            raise ValueError(f"VeRA's shared pair {tuple(shared.vera_B.shape)} x {tuple(shared.vera_A.shape)} is "
                             f"smaller than this layer ({self.out_features} x {self.in_features})")
        self.r = r
        kw = {"device": self.weight_device, "dtype": torch.float32}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **kw))
        self.dropout_p = dropout
        object.__setattr__(self, "shared", shared)  # not a submodule: the pair is saved once, not per layer

    def project_down(self, x: Tensor, A: Tensor) -> Tensor:
        """The r-dim ``d * (A_l dropout(x))``; A is frozen, so neither x nor the dropout mask is kept."""
        return self.vera_lambda_d * frozen_projection(x, A, self.dropout_p if self.training else 0.0)

    def delta(self, x: Tensor) -> Tensor:
        A, B = self.shared.slices(self.out_features, self.in_features, x.device, x.dtype)
        return self.vera_lambda_b * F.linear(self.project_down(x, A), B)

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        x = x.to(self.vera_lambda_d.dtype)
        A, B = self.shared.slices(self.out_features, self.in_features, x.device, x.dtype)
        v = self.project_down(x, A)
        if out.dtype != v.dtype or torch.is_autocast_enabled(out.device.type):
            return out + (self.vera_lambda_b * F.linear(v, B)).to(out.dtype)
        return _AddScaledUp.apply(out, v, B, self.vera_lambda_b)

    def lora_factors(self) -> LoraFactors:
        return vera_factors(self.adapter_state(), self.shared.vera_A, self.shared.vera_B, self.in_features)

    def adapter_state(self) -> dict[str, Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b.detach(), "vera_lambda_d": self.vera_lambda_d.detach()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        self.vera_lambda_b.copy_(state["vera_lambda_b"])
        self.vera_lambda_d.copy_(state["vera_lambda_d"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


def vera_factors(state: dict[str, Tensor], vera_A: Tensor, vera_B: Tensor, in_features: int) -> LoraFactors:
    b, d = state["vera_lambda_b"].float(), state["vera_lambda_d"].float()
    A = vera_A[:, :in_features].to(d.device).float() * d[:, None]
    B = vera_B[: b.shape[0]].to(b.device).float() * b[:, None]
    return LoraFactors(A, B, 1.0)


class Vera(AdapterMethod):
    name = "vera"
    title = "VeRA"
    peft_type = "VERA"
    saved_keys = ("vera_lambda_b", "vera_lambda_d")
    shared_keys = ("vera_A", "vera_B")
    has_scale = False
    quickstart_settings = {"rank": 64, "lr": 3e-2, "real_lr": 9e-2}

    # The seed of the shared frozen pair, the initial value of d, whether the pair is saved.
    option_defaults = {"projection_prng_key": 0, "d_initial": 0.1, "save_projection": True}

    def validate(self, config):
        check_int("projection_prng_key", config.projection_prng_key, minimum=0)
        check_number("d_initial", config.d_initial)
        if not isinstance(config.save_projection, bool):
            raise ConfigError(f"save_projection must be True or False; got {config.save_projection!r}")
        if config.rank_pattern or config.alpha_pattern:
            raise ConfigError("VeRA shares one rank across layers: rank_pattern/alpha_pattern are not allowed")

    def peft_fields(self, config):
        return {"peft_type": "VERA", "r": config.lora_r, "vera_dropout": config.lora_dropout,
                "d_initial": config.d_initial, "projection_prng_key": config.projection_prng_key,
                "save_projection": config.save_projection, "bias": "none", "init_weights": True}

    def from_peft(self, data, ours):
        defaults = self.option_defaults
        return dict(lora_r=data.get("r", PEFT_DEFAULT_RANK), lora_dropout=data.get("vera_dropout", 0.0) or 0.0,
                    d_initial=data.get("d_initial", defaults["d_initial"]),
                    projection_prng_key=data.get("projection_prng_key", defaults["projection_prng_key"]),
                    save_projection=bool(data.get("save_projection", defaults["save_projection"])))

    def describe(self, config):
        return {"alpha": None, "scale": "none (VeRA has no alpha/r)"}

    def trainable_parameters(self, config, shapes):
        """The two vectors of each layer: ``sum (r + d_out)``; the shared pair is a frozen buffer."""
        return sum(config.lora_r + d_out for d_out, _ in shapes.values())

    def shared_state(self, shared, config):
        return {"vera_A": shared.vera_A, "vera_B": shared.vera_B} if config.save_projection else {}

    def load_shared(self, shared, tensors, config, check_only):
        if not tensors:
            return []
        problems = [f"base_model.{key} is missing" for key in self.shared_keys if key not in tensors]
        if problems:
            return problems
        need_in, need_out, r = shared.vera_A.shape[1], shared.vera_B.shape[0], config.lora_r
        got_A, got_B = tensors["vera_A"], tensors["vera_B"]
        if got_A.shape[0] != r or got_A.shape[1] < need_in or got_B.shape[0] < need_out:
            return [f"base_model.vera_A/B have shapes {tuple(got_A.shape)}/{tuple(got_B.shape)}, this model "
                    f"needs at least ({r}, {need_in})/({need_out}, {r})"]
        if not check_only:
            shared.vera_A = got_A.to(shared.vera_A.device).float().clone()
            shared.vera_B = got_B.to(shared.vera_B.device).float().clone()
        return []

    def save_extra(self, layers):
        return {"module_in_features": {name: layer.in_features for name, layer in layers.items()}}

    def export_shared(self, config, modules, shared, in_features):
        self.check_rank(config, modules, shared)
        if shared:
            return shared
        if set(in_features) < set(modules):
            raise ValueError("VeRA adapter saved without its projections and without layer sizes")
        pair = self.create_shared(config, [(s["vera_lambda_b"].shape[0], in_features[n]) for n, s in modules.items()])
        return {"vera_A": pair.vera_A, "vera_B": pair.vera_B}

    @staticmethod
    def check_rank(config, modules, shared) -> None:
        """One rank r everywhere: the config's, each ``vera_lambda_d``'s length, the saved pair's. The config's
        r sizes the pair rebuilt for an adapter saved without it (``r x max_in`` and ``max_out x r``), so a
        config that declares more than its tensors hold is refused before that allocation."""
        r = config.lora_r
        lengths = sorted({state["vera_lambda_d"].shape[0] for state in modules.values()})
        pair = {key: tuple(shared[key].shape) for key in ("vera_A", "vera_B") if key in shared}
        if lengths != [r] or pair.get("vera_A", (r,))[0] != r or pair.get("vera_B", (0, r))[-1] != r:
            raise AdapterFileError(f"the config declares VeRA rank r={r}, but its vera_lambda_d vectors have "
                                   f"length {', '.join(map(str, lengths))}{f' and its pair is {pair}' if pair else ''}; "
                                   f"the adapter is corrupt")

    def state_shape(self, state):
        return state["vera_lambda_b"].shape[0], None, state["vera_lambda_d"].shape[0]

    def create_shared(self, config, shapes):
        max_out = max(d_out for d_out, _ in shapes)
        max_in = max(d_in for _, d_in in shapes)
        return VeraProjection(config.lora_r, max_out, max_in, config.projection_prng_key)

    def create_layer(self, base_layer, module_name, config, shared):
        return VeraLayer(base_layer, shared, config.lora_r, config.lora_dropout, config.d_initial)

    def export_factors(self, state, shared, config, module_name, in_features):
        if in_features is None:
            raise ValueError(f"VeRA module {module_name}: its input size is needed to slice the shared A")
        return vera_factors(state, shared["vera_A"], shared["vera_B"], in_features)


METHOD = Vera()
