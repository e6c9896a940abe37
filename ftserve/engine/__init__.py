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


ENGINES: dict[str, Callable[[str, EngineOptions], Engine]] = {"torch": _torch}
KINDS = ("torch", "vllm")  # what --engine accepts; the ones not in ENGINES are refused by name
NOT_YET = {"vllm": "--engine vllm is not available in this version yet; use --engine torch (the default), which "
                   "serves all five adapter methods on CPU or one GPU."}


def engine_factory(kind: str) -> Callable[[str, EngineOptions], Engine]:
    """What builds the engine ``kind``; EngineUnavailableError, saying what to use instead, if there is none."""
    if kind in ENGINES:
        return ENGINES[kind]
    raise EngineUnavailableError(NOT_YET.get(kind, f"no engine named {kind!r}; choose one of {sorted(ENGINES)}"))


def create_engine(kind: str, base: str, options: EngineOptions | None = None) -> Engine:
    """The engine ``kind`` serving the base model folder ``base``, built with ``options`` (checked already)."""
    return engine_factory(kind)(base, options or EngineOptions())
