"""Delta-LoRA (Zi et al. 2023, arXiv:2309.02411).

A and B train as in LoRA. After every optimizer step t past the start step K the paper also moves the
pretrained weight, never by a gradient: ``W_{t+1} = W_t + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)``.
Dropout is removed from the low-rank branch. The sum telescopes, so with ``(A_K', B_K')`` the factors
after the first step whose change lands in W (step K+1 done):

    W_t = W_0 + lambda * s * (B_t A_t - B_K' A_K')

We keep W_0 frozen and compute exactly that in the forward, with the W term detached (``sg``):

    h = W_0 x + s B A x + lambda * s * (sg(B) sg(A) x - B_K' A_K' x)

which is the paper's function and the paper's gradients, runs as two rank-2r products (``_AddDeltaLora``),
needs no full-size copy of W and accumulates no rounding in a bf16 W. The deployed delta
``s ((1 + lambda) B A - lambda B_K' A_K')`` is exactly the rank-2r LoRA
``A' = [A; A_K']``, ``B' = [(1 + lambda) B, -lambda B_K']`` with the same s.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import LoraFactors, add_low_rank, check_int, check_number
from .lora import Lora, LoraLayer

START_A, START_B = "lora_A_start.weight", "lora_B_start.weight"


class _AddDeltaLora(torch.autograd.Function):
    """``out + s B A x + lambda s (sg(B) sg(A) x - B_K' A_K' x)`` as two rank-2r products, the add fused.

    The forward is ``out + s [(1 + lambda) B, -lambda B_K'] [A; A_K'] x``. Backward gives the paper's
    gradients: A and B get those of ``s B A x`` alone, x that of the whole sum, through the same two
    factor pairs. Autograd on the unfused form would run four rank-r products each way.
    """

    @staticmethod
    def forward(ctx, out, x, A, B, A_start, B_start, scale: float, ratio: float):
        x2 = x.reshape(-1, x.shape[-1])
        u = x2 @ torch.cat([A, A_start]).t()  # (N, 2r): A x, then A_K' x
        up = torch.cat([B * (1.0 + ratio), B_start * -ratio], dim=1)
        ctx.save_for_backward(x2, u, A, B, A_start, B_start)
        ctx.scale, ctx.ratio, ctx.x_shape = scale, ratio, x.shape
        return torch.addmm(out.reshape(-1, out.shape[-1]), u, up.t(), alpha=scale).view(out.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, u, A, B, A_start, B_start = ctx.saved_tensors
        s, ratio, r = ctx.scale, ctx.ratio, A.shape[0]
        g = grad.reshape(-1, grad.shape[-1])
        gB = g @ torch.cat([B, B_start], dim=1)  # (N, 2r): g B, then g B_K'
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[1]:
            down = torch.cat([A * ((1.0 + ratio) * s), A_start * (-ratio * s)])
            grad_x = (gB @ down).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_A = (gB[:, :r].t() @ x2).mul_(s)
        if ctx.needs_input_grad[3]:
            grad_B = (g.t() @ u[:, :r]).mul_(s)
        return grad, grad_x, grad_A, grad_B, None, None, None, None


class DeltaLoraLayer(LoraLayer):
    def __init__(self, base_layer, r, scale, ratio: float) -> None:
        super().__init__(base_layer, r, scale, dropout=0.0)  # the paper removes dropout
        self.ratio = ratio
        self.lora_A_start: Tensor | None = None
        self.lora_B_start: Tensor | None = None

    @property
    def started(self) -> bool:
        return self.lora_A_start is not None

    @torch.no_grad()
    def start_weight_updates(self) -> None:
        """Snapshot (A_K', B_K'): from now on W moves with every change of B A."""
        self.lora_A_start = self.lora_A.weight.detach().clone()
        self.lora_B_start = self.lora_B.weight.detach().clone()

    def prepare_for_state(self, keys: set[str]) -> None:
        if START_A in keys and not self.started:
            self.start_weight_updates()

    def delta(self, x: Tensor) -> Tensor:
        lora = F.linear(self.lora_A(x), self.lora_B.weight) * self.scale
        if not self.started:
            return lora
        A, B = self._frozen_factors()
        return lora + F.linear(F.linear(x, A), B) * (self.ratio * self.scale)

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        x = x.to(self.lora_A.weight.dtype)
        if not self.started:
            return add_low_rank(out, self.lora_A(x), self.lora_B.weight, self.scale)
        if out.dtype != x.dtype or torch.is_autocast_enabled(out.device.type):
            out = add_low_rank(out, self.lora_A(x), self.lora_B.weight, self.scale)
            A, B = self._frozen_factors()
            return add_low_rank(out, F.linear(x, A), B, self.ratio * self.scale)
        return _AddDeltaLora.apply(out, x, self.lora_A.weight, self.lora_B.weight, self.lora_A_start,
                                   self.lora_B_start, self.scale, self.ratio)

    def _frozen_factors(self) -> tuple[Tensor, Tensor]:
        """sg(B) sg(A) x - B_K' A_K' x as one frozen rank-2r product: x gets its gradient, A and B do not."""
        A = torch.cat([self.lora_A.weight.detach(), self.lora_A_start], dim=0)
        B = torch.cat([self.lora_B.weight.detach(), -self.lora_B_start], dim=1)
        return A, B

    def lora_factors(self) -> LoraFactors:
        return delta_lora_factors(self.adapter_state(), self.scale, self.ratio)

    def adapter_state(self) -> dict[str, Tensor]:
        state = super().adapter_state()
        if self.started:
            state.update({START_A: self.lora_A_start, START_B: self.lora_B_start})
        return state

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        super().load_adapter_state(state)
        if START_A in state:
            self.lora_A_start = state[START_A].to(self.lora_A.weight).clone()
            self.lora_B_start = state[START_B].to(self.lora_B.weight).clone()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.started:
            self.lora_A_start, self.lora_B_start = fn(self.lora_A_start), fn(self.lora_B_start)
        return self


def delta_lora_factors(state: dict[str, Tensor], scale: float, ratio: float) -> LoraFactors:
    A, B = state["lora_A.weight"], state["lora_B.weight"]
    if START_A not in state:
        return LoraFactors(A, B, scale)
    return LoraFactors(torch.cat([A, state[START_A]], dim=0),
                       torch.cat([B * (1.0 + ratio), state[START_B] * -ratio], dim=1), scale)


class DeltaLora(Lora):
    name = "delta-lora"
    title = "Delta-LoRA"
    saved_keys = ("lora_A.weight", "lora_B.weight", START_A, START_B)
    snapshot_keys = (START_A, START_B)
    # W moves by ratio * s * (B'A' - BA) after each optimizer step past the start step.
    option_defaults = {"delta_update_ratio": 2.0, "delta_start_step": 500}
    # PEFT has no type for it: the weights file is the exact rank-2r plain LoRA, the training state beside it.
    side_file = "delta_lora_state.safetensors"

    def validate(self, config):
        check_number("delta_update_ratio", config.delta_update_ratio)
        if config.delta_update_ratio < 0:
            raise ConfigError(f"delta_update_ratio must be >= 0; got {config.delta_update_ratio}")
        check_int("delta_start_step", config.delta_start_step, minimum=0)
        if config.lora_dropout > 0:
            warnings.warn(f"Delta-LoRA removes dropout from the low-rank branch, as the paper does; "
                          f"lora_dropout={config.lora_dropout} is set to 0", stacklevel=4)
            config.lora_dropout = 0.0

    def create_layer(self, base_layer, module_name, config, shared):
        return DeltaLoraLayer(base_layer, config.rank_for(module_name), config.scale_for(module_name),
                              config.delta_update_ratio)

    def after_step(self, layers, config, steps_done):
        if steps_done == config.delta_start_step + 1:
            for layer in layers:
                layer.start_weight_updates()

    def export_factors(self, state, shared, config, module_name, in_features):
        return delta_lora_factors(state, config.scale_for(module_name), config.delta_update_ratio)


METHOD = DeltaLora()
