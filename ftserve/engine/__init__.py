"""Inference engines behind one seam (base.py): ``create_engine(kind, base, options)`` builds any of them.

``ENGINES`` maps each engine's name (``ftserve serve --engine``) to its ``EngineKind``: what it lacks in this
install, which options it refuses, how it completes them from the base and the adapters, and how it is built.
Each import is deferred, so naming the engines imports neither torch nor vLLM. Every engine in it passes the same
contract tests (tests/test_engine_contract.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Callable

from .base import Engine
from .errors import EngineUnavailableError
from .options import EngineOptions


class EngineKind(ABC):
    """One engine as ``ftserve serve`` drives it, in the order it calls these: ``missing``, ``check`` (before
    any slow work), ``prepare`` (once the base folder is known good), ``build``."""

    name: str
    serves_row_scaled = True  # the row-scaled adapter form (DoRA's, methods/factors.py); else refused at load

    def missing(self) -> str | None:
        """What to install for this engine, when this install lacks it; None when it can be built."""
        return None

    def check(self, options: EngineOptions) -> None:
        """Raise EngineOptionsError for an option this engine has no such thing for; default: it has them all."""

    def prepare(self, base: str, options: EngineOptions, adapters: dict[str, str]) -> EngineOptions | None:
        """``options`` completed from the base folder and the ``adapters`` (name -> folder) given at startup; None
        when this node serves no API and its work is done (a worker node of a multi-node engine)."""
        return options

    @abstractmethod
    def build(self, base: str, options: EngineOptions) -> Engine:
        """The engine serving the base model folder ``base``, built with ``options`` (checked already)."""


class TorchKind(EngineKind):
    """The embedded engine: one device of one machine, so it refuses vLLM's scale flags."""

    name = "torch"

    def check(self, options: EngineOptions) -> None:
        options.refuse_vllm_only(self.name)

    def build(self, base: str, options: EngineOptions) -> Engine:
        from .torch.engine import TorchEngine

        return TorchEngine.from_options(base, options)


class VllmKind(EngineKind):
    """vLLM's engine: its LoRA buffers are sized by ``max_lora_rank``, derived from the startup adapters when not
    given; the startup adapters are checked before vLLM starts (one that it cannot serve, such as a row-scaled
    one, is refused in one line); a worker node (``headless``) runs vLLM's workers and serves nothing."""

    name = "vllm"
    serves_row_scaled = False  # vLLM's LoRA adds a low-rank term; it cannot rescale the base output per row

    def missing(self) -> str | None:
        from .vllm import INSTALL, available

        return None if available() else INSTALL

    def prepare(self, base: str, options: EngineOptions, adapters: dict[str, str]) -> EngineOptions | None:
        if options.headless:
            from .vllm.headless import run_headless

            run_headless(base, options)
            return None
        from .vllm.adapters import derived_max_lora_rank, startup_rank

        if options.max_lora_rank is None:
            return replace(options, max_lora_rank=derived_max_lora_rank(base, adapters))
        startup_rank(base, adapters, options.max_lora_rank)  # refuses an adapter vLLM cannot serve, before it starts
        return options

    def build(self, base: str, options: EngineOptions) -> Engine:
        from .vllm.engine import VllmEngine

        return VllmEngine.from_options(base, options)


ENGINES: dict[str, EngineKind] = {kind.name: kind for kind in (TorchKind(), VllmKind())}
KINDS = tuple(ENGINES)  # what --engine accepts


def engine_kind(kind: str) -> EngineKind:
    """The engine ``kind``; EngineUnavailableError, saying what to install or use instead, if this install cannot
    build it."""
    if kind not in ENGINES:
        raise EngineUnavailableError(f"no engine named {kind!r}; choose one of {sorted(ENGINES)}")
    needed = ENGINES[kind].missing()
    if needed:
        raise EngineUnavailableError(needed)
    return ENGINES[kind]


def missing(kind: str) -> str | None:
    """What to install for the engine ``kind``, when this install lacks it; None when it can be built."""
    return ENGINES[kind].missing()


def engine_factory(kind: str) -> Callable[[str, EngineOptions], Engine]:
    """What builds the engine ``kind``; EngineUnavailableError as ``engine_kind`` says."""
    return engine_kind(kind).build


def create_engine(kind: str, base: str, options: EngineOptions | None = None) -> Engine:
    """The engine ``kind`` serving the base model folder ``base``, built with ``options`` (checked already)."""
    return engine_factory(kind)(base, options or EngineOptions())
