"""The registry of adapter methods: canonical name -> method. A new method is one file and one line here.

It sits below ftserve.config: a FineTuningConfig asks the registry, at construction, which method a name
means and how to check, save and read that method's settings, so nothing above branches on a method's name.
"""

from __future__ import annotations

from . import delta_lora, dora, lora, lora_fa, loraplus, vera
from .base import AdapterLayer, AdapterMethod, LoraFactors, normalised_spelling

METHODS: dict[str, AdapterMethod] = {
    module.METHOD.name: module.METHOD for module in (lora, vera, loraplus, delta_lora, lora_fa, dora)
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


def method_for_peft_type(peft_type: str, recorded: str | None, flags: dict | None = None) -> AdapterMethod | None:
    """The method a folder of ``peft_type`` holds, its adapter_config.json being ``flags``: the one we recorded,
    else the first stored as that type whose variant field (``peft_variant``, DoRA's ``use_dora``) is the one set.
    A set variant field no method of that type carries matches none (``variant_refusal`` says why)."""
    if recorded in METHODS and METHODS[recorded].peft_type == peft_type:
        return METHODS[recorded]
    chosen = set_variants(flags or {})
    return next((m for m in METHODS.values() if m.peft_type == peft_type
                 and ({m.peft_variant} - {None}) == chosen), None)


def set_variants(flags: dict) -> set[str]:
    """The variant fields (``peft_variant`` of any registered method) an adapter_config.json sets true."""
    return {m.peft_variant for m in METHODS.values() if m.peft_variant and flags.get(m.peft_variant)}


def variant_refusal(flags: dict, method: AdapterMethod) -> str | None:
    """Why an adapter_config.json ``flags`` cannot be ``method``'s folder (a variant field set that the method does
    not carry, ``use_dora`` on a VeRA folder), in one line, or None."""
    extra = sorted(set_variants(flags) - {method.peft_variant})
    if not extra:
        return None
    carriers = sorted(m.name for m in METHODS.values() if m.peft_variant in extra)
    return (f"adapter_config.json sets {', '.join(extra)}: true, which a {method.title} adapter (method {method.name}, "
            f"peft_type {method.peft_type}) cannot carry; only {', '.join(carriers)} does. Set it to false, or "
            f"save the adapter as {carriers[0]}")


__all__ = ["METHODS", "AdapterLayer", "AdapterMethod", "LoraFactors", "get_method", "method_for_peft_type",
           "method_for_spelling", "register", "set_variants", "unregister", "variant_refusal"]
