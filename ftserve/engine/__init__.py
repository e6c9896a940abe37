"""Inference engines behind one seam (base.py): ``create_engine(kind, base, options)`` builds any of them.

``ENGINES`` maps each engine's name (``ftserve serve --engine``) to what builds it; each import is deferred,
so naming the engines imports neither torch nor vLLM. Every engine in it passes the same contract tests
(tests/test_engine_contract.py).
"""

from __future__ import annotations

from typing import Callable

from .base import Engine
from .errors import EngineUnavailableError
from .options import EngineOptions


def _torch(base: str, options: EngineOptions) -> Engine:
    from .torch.engine import TorchEngine

    return TorchEngine.from_options(base, options)


def _vllm(base: str, options: EngineOptions) -> Engine:
    from .vllm.engine import VllmEngine

    return VllmEngine.from_options(base, options)


ENGINES: dict[str, Callable[[str, EngineOptions], Engine]] = {"torch": _torch, "vllm": _vllm}
KINDS = tuple(ENGINES)  # what --engine accepts


def missing(kind: str) -> str | None:
    """What to install for the engine ``kind``, when this install lacks it; None when it can be built."""
    if kind == "vllm":
        from .vllm import INSTALL, available

        return None if available() else INSTALL
    return None


def engine_factory(kind: str) -> Callable[[str, EngineOptions], Engine]:
    """What builds the engine ``kind``; EngineUnavailableError, saying what to install or use instead, if this
    install cannot build it."""
    if kind not in ENGINES:
        raise EngineUnavailableError(f"no engine named {kind!r}; choose one of {sorted(ENGINES)}")
    needed = missing(kind)
    if needed:
        raise EngineUnavailableError(needed)
    return ENGINES[kind]


def create_engine(kind: str, base: str, options: EngineOptions | None = None) -> Engine:
    """The engine ``kind`` serving the base model folder ``base``, built with ``options`` (checked already)."""
    return engine_factory(kind)(base, options or EngineOptions())
