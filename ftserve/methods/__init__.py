"""The registry of adapter methods: canonical name -> method. A new method is one file and one line here.

It sits below ftserve.config: a FineTuningConfig asks the registry, at construction, which method a name
means and how to check, save and read that method's settings, so nothing above branches on a method's name.
"""

from __future__ import annotations

from . import delta_lora, lora, lora_fa, loraplus, vera
from .base import AdapterLayer, AdapterMethod, LoraFactors, normalised_spelling

METHODS: dict[str, AdapterMethod] = {
    module.METHOD.name: module.METHOD for module in (lora, vera, loraplus, delta_lora, lora_fa)
}


def get_method(name: str) -> AdapterMethod:
    return METHODS[name]


def register(method: AdapterMethod) -> AdapterMethod:
    """Add a method defined outside this package (a plug-in, a test); ``unregister`` takes it out again."""
    taken = {spelling for known in METHODS.values() for spelling in spellings_of(known)}
    clash = sorted(set(spellings_of(method)) & taken)
    if not method.name or clash:
        raise ValueError(f"cannot register method {method.name!r}: spellings {clash} are taken")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name)


def spellings_of(method: AdapterMethod) -> tuple[str, ...]:
    return (normalised_spelling(method.name), *method.spellings)


def method_for_spelling(name: str) -> AdapterMethod | None:
    key = normalised_spelling(name)
    return next((m for m in METHODS.values() if key in spellings_of(m)), None)


def method_for_peft_type(peft_type: str, recorded: str | None) -> AdapterMethod | None:
    """The method a folder of ``peft_type`` holds: the one we recorded, else the first stored as that type."""
    if recorded in METHODS and METHODS[recorded].peft_type == peft_type:
        return METHODS[recorded]
    return next((m for m in METHODS.values() if m.peft_type == peft_type), None)


__all__ = ["METHODS", "AdapterLayer", "AdapterMethod", "LoraFactors", "get_method", "method_for_peft_type",
           "method_for_spelling", "register", "unregister"]
