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

where ``||W||^2_row`` is computed once, in fp32 (W is frozen), and the rest costs one ``(d_out x d_in) @
(d_in x r)`` product in W's own dtype (a 16-bit W is not copied to fp32; PEFT computes the whole norm in the
input's dtype) and r-sized ones in fp32: no d_out x d_in temporary. The row scale then costs two passes over the
output forward and two backward (``_RowScaledAdd``), where PEFT's autograd makes several.

There is no exact plain-LoRA form (r depends on the base weight): the served form is row-scaled
(``LoraFactors.magnitude``), folded, merged and served unmerged on the torch engine.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError
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


class _RowScaledAdd(torch.autograd.Function):
    """``y = r ⊙ (out - bias + s u B^T) + bias`` for the base output ``out`` (bias included) and ``u = A x``,
    in two passes over the output (the add into ``out``, the scale); backward in as few:

        dy/dout = r ⊙ G,   dL/du = s (r ⊙ G) B,   dL/dB = s (r ⊙ G)^T u,
        dL/dr = Σ_n G ⊙ (out - bias + s u B^T)  (per output row, over the tokens)
    """

    @staticmethod
    def forward(ctx, out, u, B, r, bias, scale: float):
        u2 = u.reshape(-1, u.shape[-1])
        adapted = torch.addmm(out.reshape(-1, out.shape[-1]), u2, B.t(), alpha=scale)  # W x + bias + s B A x
        y = adapted * r if bias is None else torch.addcmul(bias * (1 - r), adapted, r)
        ctx.save_for_backward(adapted, u2, B, r, bias)
        ctx.scale, ctx.out_shape, ctx.u_shape = scale, out.shape, u.shape
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, grad):
        adapted, u2, B, r, bias = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_r = g * r
        grad_u = grad_B = grad_r = None
        # Under autocast the forward's products ran in 16 bits: each product here takes its saved operand's
        # dtype, and autograd casts every gradient to its input's.
        if ctx.needs_input_grad[1]:
            grad_u = torch.mm(g_r.to(B.dtype), B).mul_(ctx.scale).view(ctx.u_shape)
        if ctx.needs_input_grad[2]:
            grad_B = torch.mm(g_r.t().to(u2.dtype), u2).mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            grad_r = torch.linalg.vecdot(g, adapted.to(g.dtype), dim=0)
            if bias is not None:
                grad_r -= bias * g.sum(dim=0)
        return g_r.view(ctx.out_shape), grad_u, grad_B, grad_r, None, None


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
        s = self.scale
        # B ⊙ (2 s W A^T + s^2 B A A^T), summed per row: the cross and the square terms in one pass
        terms = torch.linalg.vecdot(torch.addmm(w_a, B, A @ A.T, beta=2 * s, alpha=s * s), B)
        return (self.base_norm_sq + terms).clamp_min_(0).sqrt_()

    def row_scale(self) -> Tensor:
        """``r = m / ||W + s B A||_row``, with the gradient to m only."""
        return self.lora_magnitude_vector / self.weight_norm()

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        """``r * (out - bias + s B A dropout(x)) + bias``; PEFT's dropout form in training (module docstring)."""
        x = x.to(self.lora_A.weight.dtype)
        r = self.row_scale()
        bias = self.base_layer.bias
        bias = None if bias is None else bias.to(r.dtype)
        dropped = self.lora_dropout(x)
        u = self.lora_A(dropped)
        if not (self.training and isinstance(self.lora_dropout, nn.Dropout)):
            return _RowScaledAdd.apply(out.to(u.dtype), u, self.lora_B.weight, r, bias, self.scale).to(out.dtype)
        # Dropout on, as PEFT: out + r ⊙ (W dropout(x) + s B A dropout(x)) - W dropout(x)
        base = self.base_layer(dropped.to(out.dtype)).to(u.dtype)
        scaled = _RowScaledAdd.apply(base, u, self.lora_B.weight, r, bias, self.scale)
        return (out + (scaled - base)).to(out.dtype)

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
            raise AdapterFileError(f"{module_name}.{MAGNITUDE} has shape {tuple(state[MAGNITUDE].shape)}, but its "
                             f"lora_B.weight has {d_out} output rows; one magnitude per output row is needed")
        return dora_factors(state, config.scale_for(module_name))


METHOD = Dora()
