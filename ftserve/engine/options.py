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
    rank accepted (Delta-LoRA exports rank 2r; default: the engine's, DEFAULT_MAX_LORA_RANK on torch, derived
    from the adapters on vLLM); ``max_model_len``: prompt plus output tokens per request
    (default: the model's, at most 2048); ``max_queue``: requests waiting beyond the running ones;
    ``dtype`` and ``device``: ``auto`` takes the checkpoint's dtype and a GPU if there is one;
    ``served_model_name``: the base model's name in requests (default: the base folder's name);
    ``kv_cache_memory``: the KV cache's size, bytes (an int, or text such as ``"4GiB"``) or a fraction of the
    memory free once the model is loaded (a float in (0, 1], or text such as ``"0.5"``); by default what
    ``max_num_seqs`` requests of ``max_model_len`` tokens could need, at most half the memory free;
    ``enable_prefix_caching``: reuse the K/V of prompt blocks already computed under the same adapter.

    The fields after those are vLLM's scale flags (VLLM_ONLY), passed to vLLM as they are; an engine that has
    no such thing refuses a value other than the default (``refuse_vllm_only``), rather than ignoring it.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    max_loras: int = 8
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    max_model_len: int | None = None
    max_queue: int = 1024
    dtype: str = "auto"
    device: str = "auto"
    served_model_name: str | None = None
    kv_cache_memory: int | float | str | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # mp or ray; None: vLLM's choice
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    headless: bool = False
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    quantization: str | None = None

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
            if value is None and name in ("max_model_len", "max_lora_rank"):
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
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes"):
            if not _positive_int(getattr(self, name)):
                raise EngineOptionsError(name, f"must be an integer >= 1; got {getattr(self, name)!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise EngineOptionsError("node_rank", f"must be in [0, nnodes={self.nnodes}); got {self.node_rank!r}")
        if self.distributed_executor_backend not in (None, "mp", "ray"):
            raise EngineOptionsError("distributed_executor_backend",
                                     f"must be mp or ray; got {self.distributed_executor_backend!r}")
        if self.gpu_memory_utilization is not None and not (
                isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise EngineOptionsError("gpu_memory_utilization",
                                     f"must be in (0, 1]; got {self.gpu_memory_utilization!r}")
        if self.headless and (self.nnodes < 2 or self.node_rank < 1):
            raise EngineOptionsError("headless", "is for the worker nodes of a multi-node engine: give nnodes >= 2 "
                                                   "and node_rank >= 1")

    def refuse_vllm_only(self, engine: str) -> None:
        """An EngineOptionsError naming the first of vLLM's flags set to other than its default; ``engine``
        names the engine that has no such thing."""
        defaults = EngineOptions.__dataclass_fields__
        for name in VLLM_ONLY:
            if getattr(self, name) != defaults[name].default:
                raise EngineOptionsError(name, f"is a vLLM option; the {engine} engine has no such thing (it runs "
                                                f"on one device of one machine): use the vllm engine")


DEFAULT_MAX_LORA_RANK = 64  # the torch engine's, when --max-lora-rank is not given
VLLM_ONLY = ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "nnodes", "node_rank",
             "master_addr", "master_port", "headless", "gpu_memory_utilization", "enforce_eager", "quantization")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
