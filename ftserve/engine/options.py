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
from .declare import declared, out_of_range, setting

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


DEFAULT_MAX_LORA_RANK = 64  # the torch engine's, when --max-lora-rank is not given
MIN_CPU_LORAS = 32  # adapters kept in memory at least, when --max-cpu-loras is not given
DEFAULT_MAX_MODEL_LEN = 2048  # the most tokens per request when --max-model-len is not given and the model allows more
EXECUTOR_BACKENDS = ("mp", "ray")
MAX_PORT = 65535


@dataclass
class EngineOptions:
    """What an engine is built with; each field is declared once (``setting``: its default, its range, and its
    help, which ``ftserve serve --help`` prints for its flag). ``max_queue``: requests waiting beyond the
    running ones. ``kv_cache_memory``: bytes (an int, or text such as ``"4GiB"``) or a fraction of the memory
    free once the model is loaded (a float in (0, 1], or text such as ``"0.5"``).

    The fields declared ``vllm`` (VLLM_ONLY) are vLLM's scale flags, passed to vLLM as they are; an engine that
    has no such thing refuses a value other than the default (``refuse_vllm_only``), rather than ignoring it.
    """

    max_num_seqs: int = setting(32, "Requests decoded together in one batch.", minimum=1)
    max_num_batched_tokens: int = setting(
        4096, "Tokens in one forward pass, decodes and prompt chunks together; longer prompts are prefilled in "
              "chunks. Must exceed --max-num-seqs.", minimum=2)
    max_loras: int = setting(8, "Adapters in compute slots at once (distinct adapters in one batch).", minimum=1)
    max_cpu_loras: int | None = setting(
        None, "Adapters kept in memory, least recently used evicted first.", minimum=1,
        default_text=f"max(max-loras, {MIN_CPU_LORAS})")
    max_lora_rank: int | None = setting(
        None, "Largest adapter rank accepted (Delta-LoRA serves at twice its training rank).", minimum=1,
        default_text=f"{DEFAULT_MAX_LORA_RANK} on torch; on vllm the --adapter ranks rounded up to one vLLM "
                     f"accepts, at least vLLM's default")
    max_model_len: int | None = setting(None, "Prompt plus output tokens per request.", minimum=1,
                                        default_text=f"the model's, at most {DEFAULT_MAX_MODEL_LEN}")
    max_queue: int = setting(
        1024, "Requests waiting beyond the running ones; a request that does not fit is answered 503 with "
              "Retry-After. An ftserve flag: vLLM has none of this name.", minimum=1)
    dtype: str = setting("auto", "Weights and compute dtype; auto takes the checkpoint's.", choices=DTYPES)
    device: str = setting("auto", "cpu, cuda, cuda:N; auto picks cuda if present.")
    served_model_name: str | None = setting(None, "The base model's name in requests and /v1/models; BASE as "
                                                  "given is accepted too.", default_text="BASE's folder name")
    kv_cache_memory: int | float | str | None = setting(
        None, "KV cache size: bytes (4GiB, 512MB) or a fraction of the memory free (0.5).", metavar="SIZE",
        default_text="what --max-num-seqs requests of --max-model-len tokens need, at most half the memory free")
    enable_prefix_caching: bool = setting(
        True, "Reuse the KV cache of prompt blocks already computed under the same adapter.")
    structured_outputs_any_whitespace: bool = setting(
        False, "Let JSON answers (response_format, structured_outputs, tool calls) hold any whitespace between "
               "tokens, as vLLM by default; off, JSON is compact, so no model can loop on blanks until max_tokens "
               "(vLLM's --structured-outputs-config.disable_any_whitespace).")
    tensor_parallel_size: int = setting(1, "GPUs each layer is split over.", minimum=1, short=("-tp",), vllm=True)
    pipeline_parallel_size: int = setting(1, "Stages the layers are split into (one node each, across nodes).",
                                          minimum=1, short=("-pp",), vllm=True)
    distributed_executor_backend: str | None = setting(
        None, "How workers are run: mp (processes, with --nnodes for several nodes) or ray.",
        choices=EXECUTOR_BACKENDS, default_text="vLLM's choice", vllm=True)
    nnodes: int = setting(1, "Nodes of one engine.", minimum=1, vllm=True)
    node_rank: int = setting(0, "This node's rank; 0 serves the API, the others run with --headless.", minimum=0,
                             vllm=True)
    master_addr: str | None = setting(None, "The address of node 0, for the other nodes.", vllm=True)
    master_port: int | None = setting(None, "Node 0's port for them.", minimum=1, maximum=MAX_PORT,
                                      vllm=True)
    headless: bool = setting(False, "A worker node (--node-rank >= 1): runs workers, no API.", vllm=True)
    gpu_memory_utilization: float | None = setting(
        None, "Fraction of each GPU's memory vLLM may use.", minimum=0, maximum=1, open_minimum=True,
        default_text="vLLM's, 0.9", vllm=True)
    enforce_eager: bool = setting(False, "No CUDA graphs (less memory, slower decoding).", vllm=True)
    quantization: str | None = setting(None, "How the weights are quantized (vLLM's names: awq, gptq, fp8, "
                                             "compressed-tensors, ...; vLLM 0.32 has no bitsandbytes).",
                                       short=("-q",), vllm=True)

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
            self.max_cpu_loras = max(self.max_loras, MIN_CPU_LORAS)
        for field in INTEGERS:
            reason = out_of_range(field, getattr(self, field.name))
            if reason:
                raise EngineOptionsError(field.name, reason)
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
        if self.node_rank >= self.nnodes:
            raise EngineOptionsError("node_rank", f"must be in [0, nnodes={self.nnodes}); got {self.node_rank!r}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise EngineOptionsError("distributed_executor_backend", f"must be {' or '.join(EXECUTOR_BACKENDS)}; "
                                                                     f"got {self.distributed_executor_backend!r}")
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
        for field in declared(EngineOptions):
            if field.metadata["vllm"] and getattr(self, field.name) != field.default:
                raise EngineOptionsError(field.name, f"is a vLLM option; the {engine} engine has no such thing (it "
                                                      f"runs on one device of one machine): use the vllm engine")


VLLM_ONLY = tuple(field.name for field in declared(EngineOptions) if field.metadata["vllm"])
INTEGERS = tuple(field for field in declared(EngineOptions) if field.type in ("int", "int | None"))


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
