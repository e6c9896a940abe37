"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation; PEFT's ``use_dora``.

The adapted weight is LoRA's, with every output row rescaled to a learned length ``m`` (one value per output
feature, ``lora_magnitude_vector``)::

    W' = diag(r) (W + s B A),      r = m / ||W + s B A||_row      (||.||_row: each output row's 2-norm, over d_in)

    x ──► W (frozen) ──────────────────────────────┐
    │                                              (+) ─► · r ─► (+ bias) ─► h
    └─► dropout ─► A (r x d_in) ─► B (d_out x r) ─► · s ┘

so ``h = r * (W x + s B A dropout(x)) + bias`` (the bias is not scaled). As in the paper (its section 4.3) and
PEFT, the norm is detached in training: m and the factors get no gradient through it. ``m`` starts at
``||W||_row`` and B at zero, so a new adapter is the identity. With dropout active in training PEFT computes
the rescaled base term on the dropped input too, ``h = W x + bias + (r - 1) W dropout(x) + r s B A dropout(x)``;
so do we. ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).

The norm without the dense weight: PEFT forms ``W + s B A`` (d_out x d_in) every forward. We expand

    ||W + s B A||^2_row = ||W||^2_row + 2 s ((W A^T) ⊙ B).sum(1) + s^2 ((B (A A^T)) ⊙ B).sum(1)

where ``||W||^2_row`` is computed once (W is frozen) and the rest costs one ``(d_out x d_in) @ (d_in x r)``
product, in W's own dtype, and r-sized ones: no d_out x d_in temporary. Everything after ``W A^T`` is fp32.

There is no exact plain-LoRA form (r depends on the base weight): the served form is row-scaled
(``LoraFactors.magnitude``); folded, merged and served on the torch engine, never exported as a plain LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraFactors
from .lora import Lora, LoraLayer

MAGNITUDE = "lora_magnitude_vector"  # PEFT's saved key, after "<module>."


def dense_weight(layer) -> Tensor:
    """The stored base weight as a dense tensor in its own orientation: a bitsandbytes 4-bit one dequantized."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, quant_state)


class DoraLayer(LoraLayer):
    def __init__(self, base_layer, r: int, scale: float, dropout: float) -> None:
        super().__init__(base_layer, r, scale, dropout)
        weight_norm_sq = self.base_weight().pow(2).sum(dim=1)
        # ||W||^2_row, fp32, computed once: W is frozen; not saved (the base has it).
        self.register_buffer("base_norm_sq", weight_norm_sq, persistent=False)
        self.lora_magnitude_vector = nn.Parameter(weight_norm_sq.sqrt())

    def base_weight(self) -> Tensor:
        weight = dense_weight(self.base_layer).float()
        return weight.T if self.is_conv1d else weight

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """``||W + s B A||_row`` (d_out,) fp32, detached, by the expansion in the module docstring."""
        A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
        weight = dense_weight(self.base_layer)
        w_a = A.to(weight.dtype) @ weight if self.is_conv1d else weight @ A.T.to(weight.dtype)
        w_a = (w_a.T if self.is_conv1d else w_a).float()  # W A^T, (d_out, r)
        cross = (w_a * B).sum(dim=1)
        quad = ((B @ (A @ A.T)) * B).sum(dim=1)
        s = self.scale
        return (self.base_norm_sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def row_scale(self) -> Tensor:
        """``r = m / ||W + s B A||_row``, with the gradient to m only."""
        return self.lora_magnitude_vector / self.weight_norm()

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        """``r * (out - bias + s B A dropout(x)) + bias``; PEFT's dropout form in training (module docstring)."""
        x = x.to(self.lora_A.weight.dtype)
        r = self.row_scale()
        bias = self.base_layer.bias
        dropped = self.lora_dropout(x)
        u = self.lora_A(dropped)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):  # the rescaled base term: W dropout(x)
            base = self.base_layer(dropped.to(out.dtype))
            base = base if bias is None else base - bias
            low = F.linear(u, self.lora_B.weight) * self.scale
            return (out + (r - 1) * base + r * low).to(out.dtype)
        adapted = torch.addmm(out.reshape(-1, out.shape[-1]).to(u.dtype), u.reshape(-1, u.shape[-1]),
                              self.lora_B.weight.t(), alpha=self.scale)  # W x + bias + s B A x
        shift = 0 if bias is None else bias.to(r.dtype) * (1 - r)
        return torch.addcmul(torch.as_tensor(shift, dtype=r.dtype), adapted, r).view(out.shape).to(out.dtype)

    def lora_factors(self) -> LoraFactors:
        return dora_factors(self.adapter_state(), self.scale)

    def adapter_state(self) -> dict[str, Tensor]:
        return {**super().adapter_state(), MAGNITUDE: self.lora_magnitude_vector.detach()}

    def state_problems(self, state: dict[str, Tensor]) -> list[str]:
        """NaN or inf in the saved tensors, or a row scale that is not finite on this base weight."""
        factors = dora_factors(state, self.scale)
        problem = factors.non_finite() or factors.row_scale_problem(self.base_weight())
        return [problem] if problem else []

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        super().load_adapter_state(state)
        self.lora_magnitude_vector.copy_(state[MAGNITUDE])


def dora_factors(state: dict[str, Tensor], scale: float) -> LoraFactors:
    return LoraFactors(state["lora_A.weight"], state["lora_B.weight"], scale, state[MAGNITUDE])


class Dora(Lora):
    name = "dora"
    title = "DoRA"
    saved_keys = ("lora_A.weight", "lora_B.weight", MAGNITUDE)
    peft_variant = "use_dora"
    row_scaled = True
    layer_class = DoraLayer

    def trainable_parameters(self, config, shapes):
        """LoRA's ``sum r (d_in + d_out)`` and the magnitude, ``sum d_out``."""
        return super().trainable_parameters(config, shapes) + sum(d_out for d_out, _ in shapes.values())

    def export_factors(self, state, shared, config, module_name, in_features):
        d_out = state["lora_B.weight"].shape[0]
        if tuple(state[MAGNITUDE].shape) != (d_out,):
            raise ValueError(f"{module_name}.{MAGNITUDE} has shape {tuple(state[MAGNITUDE].shape)}, but its "
                             f"lora_B.weight has {d_out} output rows; one magnitude per output row is needed")
        return dora_factors(state, config.scale_for(module_name))


METHOD = Dora()
