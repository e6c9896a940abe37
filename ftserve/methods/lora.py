"""LoRA (Hu et al. 2021, arXiv:2106.09685).

::

    x ──► W (frozen) ─────────────────────────┐
    │                                          (+) ──► h = W x + s · B A dropout(x)
    └─► dropout ─► A (r x d_in) ─► B (d_out x r) ─► · s ┘

``s = alpha / r`` (rsLoRA, arXiv:2312.03732: ``alpha / sqrt(r)``). A is Kaiming-uniform, B is zero, so the
adapter starts as the identity. Dense delta ``s B A``; it is its own plain-LoRA export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterLayer, AdapterMethod, LoraFactors, add_low_rank

KAIMING_SLOPE = math.sqrt(5)  # nn.Linear's default initialisation, which PEFT gives LoRA's A


class LoraLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float) -> None:
        super().__init__(base_layer)
        self.r, self.scale = r, scale
        kw = {"device": self.weight_device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=KAIMING_SLOPE)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def project_down(self, x: Tensor) -> Tensor:
        """The r-dim ``A dropout(x)``."""
        return self.lora_A(self.lora_dropout(x))

    def delta(self, x: Tensor) -> Tensor:
        return F.linear(self.project_down(x), self.lora_B.weight) * self.scale

    def add_delta(self, out: Tensor, x: Tensor) -> Tensor:
        u = self.project_down(x.to(self.lora_A.weight.dtype))
        return add_low_rank(out, u, self.lora_B.weight, self.scale)

    def lora_factors(self) -> LoraFactors:
        return lora_factors(self.adapter_state(), self.scale)

    def adapter_state(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        self.lora_A.weight.copy_(state["lora_A.weight"])
        self.lora_B.weight.copy_(state["lora_B.weight"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"


def lora_factors(state: dict[str, Tensor], scale: float) -> LoraFactors:
    return LoraFactors(state["lora_A.weight"], state["lora_B.weight"], scale)


class Lora(AdapterMethod):
    name = "lora"
    title = "LoRA"
    saved_keys = ("lora_A.weight", "lora_B.weight")
    layer_class = LoraLayer

    def create_layer(self, base_layer, module_name, config, shared):
        return self.layer_class(base_layer, config.rank_for(module_name), config.scale_for(module_name),
                                config.lora_dropout)

    def export_factors(self, state, shared, config, module_name, in_features):
        return lora_factors(state, config.scale_for(module_name))


METHOD = Lora()
