"""LoRA+ (Hayou, Ghosh, Yu 2024, arXiv:2402.12354).

The adapter is LoRA's, unchanged; only training differs: B, the zero-initialised output-side factor, learns
``loraplus_lr_ratio`` times faster than A (16 by default, the paper's rule of thumb). The groups follow PEFT's
``create_loraplus_optimizer``: ``lora_B`` and any other 1-D trainable tensor get ``lr * ratio``; everything else
gets ``lr``. Unlike PEFT, ``weight_decay`` is applied as given rather than replaced by 0.
"""

from __future__ import annotations

from .base import check_number
from .lora import Lora


class LoraPlus(Lora):
    name = "lora+"
    title = "LoRA+"
    option_defaults = {"loraplus_lr_ratio": 16.0}  # learning rate of B = ratio x learning rate of A
    # Half the others' rate on a tiny model: B steps at 16x it, and at 1e-2 (B at 0.16) a tiny GPT-2's loss
    # oscillates instead of falling (200 toy steps: 5.54 -> 5.35 at 1e-2, -> 5.17 at 5e-3; a tiny Llama reaches
    # 4.40 either way). On SmolLM2 the others' rate.
    quickstart_settings = {"rank": 8, "lr": 5e-3, "real_lr": 3e-3}

    def validate(self, config):
        check_number("loraplus_lr_ratio", config.loraplus_lr_ratio, positive=True)

    def param_groups(self, named_params, config, lr, weight_decay):
        fast = [p for n, p in named_params if p.requires_grad and ("lora_B" in n or p.ndim == 1)]
        fast_ids = {id(p) for p in fast}
        slow = [p for _, p in named_params if p.requires_grad and id(p) not in fast_ids]
        return [
            {"params": slow, "lr": lr, "weight_decay": weight_decay},
            {"params": fast, "lr": lr * config.loraplus_lr_ratio, "weight_decay": weight_decay},
        ]


METHOD = LoraPlus()
