"""TorchEngine: the embedded engine. One base model, many unmerged adapters, mixed in every batch.

>>> engine = TorchEngine.from_pretrained("path/to/base", max_loras=8, max_cpu_loras=32)
>>> await engine.load_adapter("sql", "path/to/sql-adapter")            # any of the five methods
>>> async for chunk in engine.generate(GenerationRequest("SELECT", adapter="sql")):
...     print(chunk.text, end="")

Requests are checked and tokenized, and adapters named and counted, by the front end every engine shares
(../frontend.py); what is here is the torch part.

The async API runs on the caller's event loop; the model runs on one engine thread (core.py, scheduler.py) doing
continuous batching over a paged KV cache (runner.py, kv_blocks.py; one runner per architecture), with every loaded
adapter's exact plain-LoRA factors in stacked slots (lora_slots.py) behind an LRU cache (adapter_cache.py).

Errors are typed (errors.py), under the contract base.py's ``Engine`` states. ``generate`` raises the ones it can see at once (bad parameters, unknown
adapter, too long a prompt, full queue) when called; later ones (an evicted adapter that cannot be read
again, a failed step, shutdown) come out of the stream. Closing the stream cancels the request.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from torch import nn

from ..base import AdapterInfo, GenerationRequest, StreamChunk
from ..errors import EngineClosedError
from ..frontend import Frontend, FrontendMethods, adapter_tokenizer
from ..options import (
    DEFAULT_MAX_LORA_RANK,
    EngineOptions,
    EngineOptionsError,
    checkpoint_dtype,
    context_limit,
)
from ..text import TextStream
from .adapter_cache import AdapterCache, AdapterRecord, read_factors
from .architectures import runner_class
from .core import EngineCore
from .detokenize import OutputStream
from .kv_blocks import BlockPool
from .lora_slots import LoraSlots
from .openmp import release_pool
from .sampling import make_generator
from .scheduler import Sequence

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TorchEngine(FrontendMethods):
    """Serves a transformers Llama-family causal LM (or GPT-2) and any number of adapters on it.

    Built with EngineOptions (options.py says what each one means): ``TorchEngine(model, tokenizer, options)``,
    or with the options as keywords, ``TorchEngine(model, tokenizer, max_loras=8)``. The KV cache is a pool
    of blocks of 16 positions (``kv_cache_memory``) that the requests in flight take as their tokens need them.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, options: EngineOptions | None = None,
                 **keywords: Any) -> None:
        options = with_keywords(options, keywords)
        runner = runner_class(model)
        config = model.config
        limit = context_limit(config.to_dict()) or config.max_position_embeddings
        if options.max_model_len is not None and options.max_model_len > limit:
            raise EngineOptionsError("max_model_len", f"is {options.max_model_len}, beyond the model's {limit} "
                                                      f"positions (max_position_embeddings)")
        self.options = options
        self.max_model_len = options.max_model_len or min(limit, 2048)
        self.model_name = options.served_model_name or "base"
        self.model = model.eval().requires_grad_(False)
        self.max_loras, self.max_cpu_loras = options.max_loras, options.max_cpu_loras
        self.max_lora_rank, self.max_queue = options.max_lora_rank or DEFAULT_MAX_LORA_RANK, options.max_queue
        self.slots = LoraSlots(model, self.max_loras, self.max_lora_rank, exclude=(model.get_output_embeddings(),))
        self.shapes = self.slots.shapes()
        self.cache = AdapterCache(self.slots, self.max_loras, self.max_cpu_loras)
        self.runner = runner(model, self.max_model_len, options.kv_cache_memory, options.max_num_seqs)
        self.pool = BlockPool(self.runner.num_blocks, self.runner.row_blocks, options.enable_prefix_caching)
        self.core = EngineCore(self.runner, self.slots, self.cache, self.pool, options.max_num_seqs,
                               options.max_num_batched_tokens, self._deliver)
        eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.frontend = Frontend(tokenizer, model_name=self.model_name, vocab_size=config.vocab_size,
                                 max_model_len=self.max_model_len, max_queue=self.max_queue,
                                 eos_ids=frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos]))
        self.adapters = self.frontend.adapters
        self._reads: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_pretrained(cls, base_path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                        device: str = "cpu", tokenizer: Any = None, options: EngineOptions | None = None,
                        **keywords: Any) -> "TorchEngine":
        """Load a base model folder (and its tokenizer, if it has one) and build the engine on ``device``;
        the options as in ``__init__``, ``served_model_name`` by default the folder's name."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = with_keywords(options, keywords)
        torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype; got {dtype!r}")
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype).to(device)
        if tokenizer is None and any((Path(base_path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(base_path)
        if options.served_model_name is None:
            options = replace(options, served_model_name=Path(base_path).name)
        return cls(model, tokenizer, options)

    @classmethod
    def from_options(cls, base_path: str | os.PathLike, options: EngineOptions) -> "TorchEngine":
        """What ``create_engine("torch", ...)`` builds: ``dtype`` and ``device`` ``auto`` resolved here (the
        checkpoint's dtype; cuda when there is a GPU). vLLM's scale flags are refused, not ignored."""
        options.refuse_vllm_only("torch")
        dtype = checkpoint_dtype(base_path) if options.dtype == "auto" else options.dtype
        device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
        return cls.from_pretrained(base_path, dtype=dtype, device=device, options=options)

    # Life cycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._bind_loop()

    async def shutdown(self) -> None:
        if self.core.thread.is_alive():
            self.core.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.core.thread.join)
        self.core.closed = True

    async def __aenter__(self) -> "TorchEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self.core.closed:
            raise EngineClosedError("this engine was shut down; build a new one")
        if self._loop is None:
            self._loop = loop
            self.adapters.bind()
            self.core.thread.start()
        elif self._loop is not loop:
            raise EngineClosedError("this engine runs on another event loop; use it from the loop that started it")
        # OpenMP workers that torch work on this thread made (loading the model, a user's code between
        # requests) would slow the engine thread's (openmp.py); a no-op when there are none.
        release_pool()

    # Requests ---------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Check the request and return its stream; closing the stream early cancels the request."""
        self._bind_loop()
        params = request.params
        ready = self.frontend.prepare(request, self.core.queued)
        seq = Sequence(prompt=ready.prompt, params=params, adapter=ready.adapter,
                       generator=make_generator(params, self.runner.device), stop_ids=ready.stop_ids)
        return self._stream(seq, TextStream(ready.tokenizer, ready.prompt, list(params.stop)))

    async def _stream(self, seq: Sequence, text: TextStream) -> AsyncIterator[StreamChunk]:
        outputs = seq.outputs = OutputStream(seq, text)
        submitted = pinned = False
        with self.core.queued_lock:
            self.frontend.check_queue(self.core.queued)
            self.core.queued += 1
        try:
            if seq.adapter is not None:
                self.adapters.pin(seq.adapter)
                pinned = True
                await self._make_resident(seq.adapter)
            if self.core.closed:
                raise EngineClosedError("the engine was shut down")
            self.core.submit(seq)
            submitted = True
            while True:
                item = await outputs.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True
            if not submitted:
                with self.core.queued_lock:
                    self.core.queued -= 1
            if pinned:
                self.adapters.unpin(seq.adapter)

    def _deliver(self, items: list[tuple[Sequence, object]]) -> None:
        """From the engine thread: one step's outputs, handed to the event loop in one wake-up."""
        try:
            self._loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the caller's loop is gone: nobody reads these requests any more
            for seq, _ in items:
                seq.cancelled = True

    async def _make_resident(self, record: AdapterRecord) -> None:
        """Bring a pinned adapter's factors into memory, reading its folder again if they were evicted, and
        waiting while every cached adapter is pinned by requests in flight."""
        factors = None
        while True:
            self.adapters.unpinned.clear()
            if self.cache.put(record, factors):
                return
            if factors is None:
                factors = await self._read_once(record.info.name, Path(record.info.path))
                continue
            await self.adapters.unpinned.wait()

    async def _read_once(self, name: str, path: Path):
        """One disk read per adapter however many requests wait for it, checked against the adapter's root (if
        it was loaded under one) on this read too: the folder may have changed since it was loaded."""
        if name not in self._reads:
            loop = asyncio.get_running_loop()
            root = self.adapters.records[name].root  # the caller holds a pin, so the record is there
            future = loop.run_in_executor(None, read_factors, path, self.slots, self.max_lora_rank, root)
            self._reads[name] = future
            future.add_done_callback(lambda _: self._reads.pop(name, None))
        _, factors = await asyncio.shield(self._reads[name])
        return factors

    # Adapters --------------------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str, root: str | os.PathLike | None = None) -> AdapterInfo:
        """Read, check and register an adapter (a folder or a Hub repo id) under ``name``; requests may use it
        as soon as this returns. Requests in flight are not disturbed.

        With ``root`` (the server's runtime load API), ``path`` must be a folder whose every file resolves
        inside ``root``, now and on every later read (PathOutsideAdapterRootError, 403); never a Hub id.
        """
        self._bind_loop()
        resolved, root = await self.adapters.locate(name, path, root)
        loop = asyncio.get_running_loop()
        folder, factors = await loop.run_in_executor(None, read_factors, resolved, self.slots, self.max_lora_rank,
                                                     root)
        # The check read_factors made also covered the tokenizer files, read just after it.
        tokenizer = await loop.run_in_executor(None, adapter_tokenizer, resolved)
        rank = max(A.shape[0] for A, _, _ in factors.values())
        info = AdapterInfo(name=name, path=str(resolved), method=folder.config.method, rank=rank,
                           loaded_at=time.time())
        record = AdapterRecord(info=info, tokenizer=tokenizer, root=root)
        self.adapters.add(record)
        self.cache.put(record, factors)  # if every cached adapter is busy, it is read again on first use
        return info

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` at once, wait for its requests in flight to end, then free it."""
        self._bind_loop()
        record = await self.adapters.unload(name)
        self.cache.drop(record)
        self.core.release_slot(record)

    def healthy(self) -> bool:
        return not self.core.closed and (self._loop is None or self.core.thread.is_alive())

    def stats(self) -> dict[str, float]:
        return {
            "queued_requests": float(self.core.queued),
            "running_requests": float(len(self.core.running)),
            "adapters_loaded": float(len(self.list_adapters())),
            "adapters_cached": float(len(self.cache.cached)),
            "lora_slots_active": float(self.cache.active()),
            "max_loras": float(self.max_loras),
            "max_cpu_loras": float(self.max_cpu_loras),
            "finished_requests_total": float(self.core.finished_requests),
            "generated_tokens_total": float(self.core.generated_tokens),
            "steps_total": float(self.core.steps),
            "prefill_tokens_total": float(self.core.prefill_tokens),
            "kv_cache_bytes": float(self.runner.nbytes()),
            "lora_slot_bytes": float(self.slots.nbytes()),
            "kv_blocks_used": float(self.pool.used()),
            "kv_blocks_free": float(self.pool.available()),
            "prefix_cache_queries_total": float(self.pool.queries),
            "prefix_cache_hits_total": float(self.pool.hits),
            "preemptions_total": float(self.pool.preemptions),
        }


OLD_NAMES = {"max_batch_size": "max_num_seqs", "model_name": "served_model_name"}  # this engine's names before vLLM's


def with_keywords(options: EngineOptions | None, keywords: dict[str, Any]) -> EngineOptions:
    """``options`` with ``keywords`` (EngineOptions fields, or their older names here) put over them."""
    keywords = {OLD_NAMES.get(name, name): value for name, value in keywords.items()}
    return replace(options or EngineOptions(), **keywords)


def _put_all(items: list[tuple[Sequence, object]]) -> None:
    for seq, item in items:
        seq.outputs.put(item)
