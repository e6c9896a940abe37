"""The registry of adapter methods: canonical name -> method. A new method is one file and one line here."""

from __future__ import annotations

from . import delta_lora, lora, lora_fa, loraplus, vera
from .base import AdapterLayer, AdapterMethod, LoraFactors

METHODS: dict[str, AdapterMethod] = {
    module.METHOD.name: module.METHOD for module in (lora, vera, loraplus, delta_lora, lora_fa)
}


def get_method(name: str) -> AdapterMethod:
    return METHODS[name]


__all__ = ["METHODS", "AdapterLayer", "AdapterMethod", "LoraFactors", "get_method"]
