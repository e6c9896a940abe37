"""TorchEngine: the embedded engine. One base model, many unmerged adapters, mixed in every batch.

>>> engine = TorchEngine.from_pretrained("path/to/base", max_loras=8, max_cpu_loras=32)
>>> await engine.load_adapter("sql", "path/to/sql-adapter")            # any of the six methods
>>> async for chunk in engine.generate(GenerationRequest("SELECT", adapter="sql")):
...     print(chunk.text, end="")

Requests are checked and tokenized, adapters named and counted, and streams, the life cycle and adapter loads
kept, as on every engine, by ../engine_base.py and ../frontend.py; what is here is the torch core.

The async API runs on the caller's event loop; the model runs on one engine thread (core.py, scheduler.py) doing
continuous batching over a paged KV cache (runner.py, kv_blocks.py; one runner per architecture), with every loaded
adapter's exact plain-LoRA factors in stacked slots (lora_slots.py) behind an LRU cache (adapter_cache.py).

Errors are typed (errors.py), under the contract base.py's ``Engine`` states. ``generate`` raises the ones it
can see at once (bad parameters, unknown adapter, too long a prompt, full queue) when called; later ones (an
evicted adapter that cannot be read again, a failed step, shutdown) come out of the stream. Closing the
stream cancels the request.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import AdapterInfo, GenerationRequest
from ..engine_base import EngineBase, ReadAdapter
from ..errors import EngineClosedError
from ..frontend import Prepared, folder_tokenizer
from ..options import DEFAULT_MAX_LORA_RANK, EngineOptions, checkpoint_dtype
from ..structured import StructuredCompiler
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


class TorchEngine(EngineBase):
    """Serves a transformers Llama-family causal LM (or GPT-2) and any number of adapters on it.

    Built with EngineOptions (options.py says what each one means): ``TorchEngine(model, tokenizer, options)``,
    or with the options as keywords, ``TorchEngine(model, tokenizer, max_loras=8)``. The KV cache is a pool
    of blocks of BLOCK_SIZE positions (``kv_cache_memory``) that the requests in flight take as their tokens
    need them. The engine starts on its first use, ``start`` or any call on the event loop.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, options: EngineOptions | None = None,
                 **keywords: Any) -> None:
        options = with_keywords(options, keywords)
        runner = runner_class(model)
        super().__init__(tokenizer, model.config.to_dict(), options, options.served_model_name or "base")
        self.model = model.eval().requires_grad_(False)
        self.max_lora_rank = options.max_lora_rank or DEFAULT_MAX_LORA_RANK
        self.slots = LoraSlots(model, self.max_loras, self.max_lora_rank, exclude=(model.get_output_embeddings(),))
        self.shapes = self.slots.shapes()
        self.cache = AdapterCache(self.slots, self.max_loras, self.max_cpu_loras)
        self.runner = runner(model, self.max_model_len, options.kv_cache_memory, options.max_num_seqs)
        self.pool = BlockPool(self.runner.num_blocks, self.runner.row_blocks, options.enable_prefix_caching)
        self.core = EngineCore(self.runner, self.slots, self.cache, self.pool, options.max_num_seqs,
                               options.max_num_batched_tokens, self._deliver, self.waiting.leave)
        self._reads: dict[str, asyncio.Future] = {}
        self.structured = StructuredCompiler(self.frontend.vocab_size, self.frontend.eos_ids,
                                             options.structured_outputs_any_whitespace)

    @classmethod
    def from_pretrained(cls, base_path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                        device: str = "cpu", tokenizer: Any = None, options: EngineOptions | None = None,
                        **keywords: Any) -> "TorchEngine":
        """Load a base model folder (and its tokenizer, if it has one) and build the engine on ``device``;
        the options as in ``__init__``, ``served_model_name`` by default the folder's name."""
        from transformers import AutoModelForCausalLM

        options = with_keywords(options, keywords)
        torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype; got {dtype!r}")
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype).to(device)
        if tokenizer is None:
            tokenizer = folder_tokenizer(base_path)
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

    @property
    def closed(self) -> bool:
        return self.core.closed

    def _check_open(self) -> None:
        if self._bind_loop():
            self.core.thread.start()
        # OpenMP workers that torch work on this thread made (loading the model, a user's code between
        # requests) would slow the engine thread's (openmp.py); a no-op when there are none.
        release_pool()

    async def _start_core(self) -> None:
        self.core.thread.start()
        release_pool()

    async def shutdown(self) -> None:
        if self.core.thread.is_alive():
            self.core.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.core.thread.join)
        self.core.closed = True
        self.structured.close()

    def healthy(self) -> bool:
        return not self.core.closed and (self._loop is None or self.core.thread.is_alive())

    # Requests ---------------------------------------------------------------------------------------------

    def _request(self, ready: Prepared, request: GenerationRequest) -> Sequence:
        params = request.params
        seq = Sequence(prompt=ready.prompt, params=params, adapter=ready.adapter,
                       generator=make_generator(params, self.runner.device), stop_ids=ready.stop_ids)
        seq.outputs = OutputStream(seq, TextStream(ready.tokenizer, ready.prompt, list(params.stop)))
        return seq

    async def _submit(self, seq: Sequence):
        spec = seq.params.structured_outputs
        if spec is not None:  # compiled off the event loop, or refused (RequestError) within its bound
            seq.constraint = await self.structured.constraint(spec, seq.outputs.text.tokenizer)
        if seq.adapter is not None:
            await self._make_resident(seq.adapter)
        if self.core.closed:
            raise EngineClosedError("the engine was shut down")
        self.core.submit(seq)
        return seq.outputs.queue.get

    async def _end(self, seq: Sequence) -> None:
        seq.cancelled = True

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

    def _read_adapter(self, path: Path, root: Path | None) -> ReadAdapter:
        folder, factors = read_factors(path, self.slots, self.max_lora_rank, root)
        return ReadAdapter(folder.config.method, max(A.shape[0] for A, _, _ in factors.values()), factors)

    async def _register(self, info: AdapterInfo, tokenizer: Any, root: Path | None, factors) -> AdapterRecord:
        return AdapterRecord(info=info, tokenizer=tokenizer, root=root)

    def _added(self, record: AdapterRecord, factors) -> None:
        self.cache.put(record, factors)  # if every cached adapter is busy, it is read again on first use

    async def _unregister(self, record: AdapterRecord) -> None:
        self.cache.drop(record)
        self.core.release_slot(record)

    def _core_stats(self) -> dict[str, float]:
        return dict(
            running_requests=len(self.core.running), adapters_cached=len(self.cache.cached),
            lora_slots_active=self.cache.active(), finished_requests_total=self.core.finished_requests,
            generated_tokens_total=self.core.generated_tokens, steps_total=self.core.steps,
            prefill_tokens_total=self.core.prefill_tokens, kv_cache_bytes=self.runner.nbytes(),
            lora_slot_bytes=self.slots.nbytes(), kv_blocks_used=self.pool.used(),
            kv_blocks_free=self.pool.available(), prefix_cache_queries_total=self.pool.queries,
            prefix_cache_hits_total=self.pool.hits, preemptions_total=self.pool.preemptions)


# A back-compatibility shim: this engine's keyword names from before it took vLLM's, still accepted.
OLD_NAMES = {"max_batch_size": "max_num_seqs", "model_name": "served_model_name"}


def with_keywords(options: EngineOptions | None, keywords: dict[str, Any]) -> EngineOptions:
    """``options`` with ``keywords`` (EngineOptions fields, or their older names here) put over them."""
    keywords = {OLD_NAMES.get(name, name): value for name, value in keywords.items()}
    return replace(options or EngineOptions(), **keywords)


def _put_all(items: list[tuple[Sequence, object]]) -> None:
    for seq, item in items:
        seq.outputs.put(item)
