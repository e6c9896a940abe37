"""EngineOptions: what every engine is built with, under vLLM's names, checked once for all engines.

The names are vLLM's engine arguments (``--max-num-seqs`` is ``max_num_seqs``), so the CLI passes its flags
through unchanged and the vLLM engine hands them on as they are. An engine reads what applies to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


class EngineOptionsError(ConfigError):
    """An engine option out of range, in Python's words (``max_num_seqs must be ...``): ``name`` is the option,
    ``flag`` its ``ftserve serve`` flag, ``reason`` the rest, naming other options by their Python names."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name, self.flag, self.reason = name, flag(name), reason


def flag(name: str) -> str:
    """``max_num_seqs`` -> ``--max-num-seqs``: how vLLM and ``ftserve serve`` spell an option."""
    return "--" + name.replace("_", "-")


@dataclass
class EngineOptions:
    """``max_num_seqs``: requests decoded together; ``max_num_batched_tokens``: tokens in one forward pass,
    decodes and prompt chunks together (longer prompts are prefilled in chunks), more than ``max_num_seqs``;
    ``max_loras``: adapters in compute slots at once; ``max_cpu_loras``: adapters kept in memory, least
    recently used evicted first (default ``max(max_loras, 32)``); ``max_lora_rank``: the largest exported
    rank accepted (Delta-LoRA exports rank 2r); ``max_model_len``: prompt plus output tokens per request
    (default: the model's, at most 2048); ``max_queue``: requests waiting beyond the running ones;
    ``dtype`` and ``device``: ``auto`` takes the checkpoint's dtype and a GPU if there is one;
    ``served_model_name``: the base model's name in requests (default: the base folder's name);
    ``kv_cache_memory``: the KV cache's size, bytes (an int, or text such as ``"4GiB"``) or a fraction of the
    memory free once the model is loaded (a float in (0, 1], or text such as ``"0.5"``); by default what
    ``max_num_seqs`` requests of ``max_model_len`` tokens could need, at most half the memory free;
    ``enable_prefix_caching``: reuse the K/V of prompt blocks already computed under the same adapter.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    max_loras: int = 8
    max_cpu_loras: int | None = None
    max_lora_rank: int = 64
    max_model_len: int | None = None
    max_queue: int = 1024
    dtype: str = "auto"
    device: str = "auto"
    served_model_name: str | None = None
    kv_cache_memory: int | float | str | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.kv_cache_memory, str):
            self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        memory = self.kv_cache_memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float))
                                   or memory <= 0 or (isinstance(memory, float) and memory > 1)):
            raise EngineOptionsError("kv_cache_memory", f"must be a number of bytes (>= 1) or a fraction of the "
                                                        f"memory free in (0, 1]; got {memory!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise EngineOptionsError("enable_prefix_caching",
                                     f"must be true or false; got {self.enable_prefix_caching!r}")
        if self.max_cpu_loras is None and isinstance(self.max_loras, int):
            self.max_cpu_loras = max(self.max_loras, 32)
        for name in ("max_num_seqs", "max_loras", "max_lora_rank", "max_queue", "max_num_batched_tokens",
                     "max_cpu_loras", "max_model_len"):
            value = getattr(self, name)
            if value is None and name == "max_model_len":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineOptionsError(name, f"must be an integer >= 1; got {value!r}")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise EngineOptionsError("max_num_batched_tokens",
                                     f"must be > max_num_seqs ({self.max_num_seqs}), so that prompts "
                                     f"can be prefilled while every row decodes")
        if self.max_cpu_loras < self.max_loras:
            raise EngineOptionsError("max_cpu_loras", f"must be >= max_loras ({self.max_loras})")
        if self.dtype not in DTYPES:
            raise EngineOptionsError("dtype", f"must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise EngineOptionsError("device", f"must be auto, cpu, cuda or cuda:N; got {self.device!r}")


def checkpoint_dtype(base: str | os.PathLike) -> str:
    """What ``dtype="auto"`` means: the dtype recorded in the checkpoint's config.json, float32 if none."""
    config = Path(base) / "config.json"
    try:
        recorded = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"
    dtype = recorded.get("dtype") or recorded.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES[1:] else "float32"


def context_limit(config: dict) -> int | None:
    """The most positions a checkpoint's config.json allows (a sliding window that applies bounds it, as full
    attention equals sliding-window attention up to the window); None when it does not say."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    window = config.get("sliding_window")
    if limit and window and (config.get("model_type") == "mistral" or config.get("use_sliding_window")):
        limit = min(limit, window)
    return int(limit) if limit else None


def check_max_model_len(base: str | os.PathLike, max_model_len: int | None) -> None:
    """Refuse a ``max_model_len`` beyond what the checkpoint at ``base`` allows, from its config.json alone."""
    try:
        config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the engine reports an unreadable checkpoint as it loads it
    limit = context_limit(config) if isinstance(config, dict) else None
    if max_model_len is not None and limit is not None and max_model_len > limit:
        raise EngineOptionsError("max_model_len", f"is {max_model_len}, beyond the model's {limit} positions "
                                                  f"(max_position_embeddings in {Path(base) / 'config.json'})")


MEMORY_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6,
                "mib": 2 ** 20, "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30, "t": 10 ** 12, "tb": 10 ** 12,
                "tib": 2 ** 40}


def parse_memory(text: str) -> int | float:
    """``"4GiB"``, ``"512MB"``, ``"1000000"`` -> bytes (an int); ``"0.5"`` -> a fraction of the memory free."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = None
    if amount is None or unit not in MEMORY_UNITS:
        raise EngineOptionsError("kv_cache_memory", f"must be bytes (as 4GiB, 512MB or 1000000) or a fraction of "
                                                    f"the memory free (as 0.5); got {text!r}")
    if not unit and "." in number and amount <= 1:
        return amount
    return int(amount * MEMORY_UNITS[unit])
