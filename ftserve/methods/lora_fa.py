"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): LoRA with the projection-down matrix A frozen at init.

Forward and delta are LoRA's: ``h = W x + s B A dropout(x)``; only B trains, so ``delta W = s B A`` stays in the
row space of the initial A and the plain-LoRA export is the adapter itself.

The point of the method is activation memory: ``dL/dB = s dy^T (A x)`` needs only the r-dim ``A x``, not the
d_in-dim input. Autograd alone already skips ``x`` when A is frozen, but with dropout it would keep the dropout
mask (a float per input element). ``frozen_projection`` keeps a dropout seed instead and draws the mask again
in backward; autograd keeps the r-dim ``A x`` for ``dL/dB``.
"""

from __future__ import annotations

from torch import Tensor

from .frozen_projection import frozen_projection
from .lora import Lora, LoraLayer


class LoraFALayer(LoraLayer):
    def __init__(self, base_layer, r, scale, dropout) -> None:
        super().__init__(base_layer, r, scale, dropout)
        self.lora_A.weight.requires_grad_(False)
        self.dropout_p = dropout

    def project_down(self, x: Tensor) -> Tensor:
        return frozen_projection(x, self.lora_A.weight, self.dropout_p if self.training else 0.0)


class LoraFA(Lora):
    name = "lora-fa"
    title = "LoRA-FA"
    quickstart_settings = {"rank": 8, "lr": 1e-2, "real_lr": 1e-2}  # B alone learns: a larger step on SmolLM2
    layer_class = LoraFALayer

    def trainable_parameters(self, config, shapes):
        """B alone: ``sum r d_out``."""
        return sum(config.rank_for(name) * d_out for name, (d_out, _) in shapes.items())

    def frozen_parameters(self, config, shapes):
        """A, frozen at init: ``sum r d_in``."""
        return sum(config.rank_for(name) * d_in for name, (_, d_in) in shapes.items())


METHOD = LoraFA()
