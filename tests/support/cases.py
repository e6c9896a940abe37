"""The case matrix: (case name, model kind, FineTuningConfig settings) rows that every generic check runs over.

One row per registered method on a Llama- and a GPT-2-shaped model (``Conv1D``), plus rsLoRA's other scale.
The rows are read from the registry when the tests are collected, and each test asks a row's method what it
needs (its learning rate, its closed-form parameter counts, its start step), so a method registered with
``ftserve.methods.register`` before collection joins every matrix without a line here.
"""

from __future__ import annotations

from typing import NamedTuple

from ftserve.methods import METHODS as REGISTRY
from ftserve.methods import AdapterMethod

METHODS = tuple(REGISTRY)  # the method names, as registered when the tests are collected
PLAIN_FORM = tuple(name for name, method in REGISTRY.items() if not method.row_scaled)  # exact plain-LoRA export
KINDS = ("llama", "gpt2")
RANK, ALPHA = 4, 8
RANK_WITHOUT_SCALE = 16  # VeRA: its shared pair is sliced per layer, and its two vectors want a larger rank


class Case(NamedTuple):
    name: str  # the method's name, or the row's own ("lora-rslora")
    kind: str  # "llama" or "gpt2"
    settings: dict  # FineTuningConfig keyword arguments, ``method`` among them

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.name}"

    @property
    def method(self) -> AdapterMethod:
        return REGISTRY[self.settings["method"]]


def case_settings(method: AdapterMethod) -> dict:
    """Small settings for ``method``: rank 4, alpha 8; rank 16 for a method without a scale."""
    if method.has_scale:
        return dict(method=method.name, lora_r=RANK, lora_alpha=ALPHA)
    return dict(method=method.name, lora_r=RANK_WITHOUT_SCALE)


SETTINGS = [(name, case_settings(method)) for name, method in REGISTRY.items()]
SETTINGS += [("lora-rslora", dict(method="lora", lora_r=RANK, lora_alpha=ALPHA, use_rslora=True))]
CASES = [Case(name, kind, settings) for kind in KINDS for name, settings in SETTINGS]
CASE_IDS = [case.id for case in CASES]


def start_step(method: str, step: int) -> dict:
    """Delta-LoRA's ``delta_start_step`` as a setting, for a method that has it (its default, 500, lies past
    every test's run), else nothing: a setting of another method is refused."""
    return {"delta_start_step": step} if "delta_start_step" in REGISTRY[method].option_defaults else {}


def learning_rate(method: str) -> float:
    """The rate the method declares for a tiny model (its quickstart's), at which a few hundred steps of the
    toy task lower the loss."""
    return REGISTRY[method].quickstart_settings["lr"]
