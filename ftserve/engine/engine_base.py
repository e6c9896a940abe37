"""What every engine does above its core, written once: ``EngineBase``.

An engine is a front end (frontend.py: prompt -> ids, request checks, the adapter registry) and a core that
runs token ids (the torch engine's model thread, vLLM's ``AsyncLLM``). Everything between the two is the same
for every engine, and lives here:

* the base model's config: vocabulary, end-of-sequence ids and context length, read by one function
  (``read_base_config``, whose context length is ``options.context_limit``), and its tokenizer
  (``folder_tokenizer``);
* the life cycle: the engine binds to the event loop that first starts it and refuses calls from another,
  or after ``shutdown``; ``async with engine:`` starts and shuts it down;
* a request's stream: checked by the front end when ``generate`` is called, then counted in the queue and
  its adapter pinned until the stream ends, however it ends;
* loading an adapter (find the folder, read and check it off the event loop, its tokenizer, its record) and
  unloading one (refuse new requests, wait for those in flight);
* ``stats()``, an ``EngineStats`` with every key of STATS_KEYS.

An engine subclass supplies only what is its core's: ``_check_open`` (before every call on the event loop),
``_start_core`` (on ``start``), ``_request`` (its object for a checked request, made by ``generate``),
``_submit`` (hand it to the core), ``_end`` (after its stream, however it ended, submitted or not),
``_read_adapter`` (read and check a folder, on an executor thread), ``_register`` / ``_added`` /
``_unregister`` (an adapter with its core), ``_core_stats``, ``shutdown`` and ``healthy``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from .base import AdapterInfo, EngineStats, GenerationRequest, StreamChunk
from .errors import EngineClosedError
from .frontend import Frontend, Prepared, RegisteredAdapter, folder_tokenizer
from .options import DEFAULT_MAX_MODEL_LEN, EngineOptions, EngineOptionsError, context_limit


@dataclass(frozen=True)
class BaseConfig:
    """What an engine takes from its base model's config.json: the vocabulary's size, the ids that end a
    sequence, and ``max_model_len``, the positions a request may use (prompt and output)."""

    vocab_size: int
    eos_ids: frozenset[int]
    max_model_len: int


def read_base_config(config: dict, tokenizer: Any, max_model_len: int | None) -> BaseConfig:
    """``config`` (a config.json as a dict) read for an engine: end of sequence from the config, else from the
    tokenizer; ``max_model_len`` as given, refused beyond the model's context (``context_limit``: GPT-2's
    ``n_positions`` as well as ``max_position_embeddings``), or by default that context, at most
    DEFAULT_MAX_MODEL_LEN."""
    limit = context_limit(config)
    if max_model_len is not None and limit is not None and max_model_len > limit:
        raise EngineOptionsError("max_model_len", f"is {max_model_len}, beyond the model's {limit} positions "
                                                  f"(its config.json)")
    eos = config.get("eos_token_id")
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return BaseConfig(int(config["vocab_size"]), eos_ids,
                      max_model_len or min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN))


class WaitingCount:
    """Requests submitted and not yet running: counted up on the event loop, counted down there or on an
    engine's own thread, hence the lock."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def enter(self, check: Callable[[int], None]) -> None:
        """One more, after ``check(count)`` (which raises when the queue is full)."""
        with self.lock:
            check(self.count)
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


@dataclass
class ReadAdapter:
    """An adapter folder read and checked by an engine: its method, its served rank, and what the engine
    registers with its core (factors, an export)."""

    method: str
    rank: int
    data: Any


class EngineBase(ABC):
    """The Engine protocol (base.py) over a front end; a subclass supplies its core (module docstring)."""

    closed: bool  # shut down (or the core died): every call is refused

    def __init__(self, tokenizer: Any, config: dict, options: EngineOptions, model_name: str) -> None:
        base = read_base_config(config, tokenizer, options.max_model_len)
        self.options, self.model_name, self.max_model_len = options, model_name, base.max_model_len
        self.max_queue, self.max_loras, self.max_cpu_loras = options.max_queue, options.max_loras, options.max_cpu_loras
        self.frontend = Frontend(tokenizer, model_name=model_name, vocab_size=base.vocab_size,
                                 max_model_len=self.max_model_len, max_queue=self.max_queue, eos_ids=base.eos_ids)
        self.adapters = self.frontend.adapters
        self.waiting = WaitingCount()
        self._loop: asyncio.AbstractEventLoop | None = None

    # Life cycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the engine to the running event loop and start its core; again on that loop, nothing."""
        if self._bind_loop():
            try:
                await self._start_core()
            except BaseException:
                self._loop = None  # a failed start may be tried again
                raise

    async def __aenter__(self) -> "EngineBase":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    def _bind_loop(self) -> bool:
        """EngineClosedError once shut down or on another event loop than the one bound; True when this call
        bound the running loop (the caller starts the core)."""
        loop = asyncio.get_running_loop()
        if self.closed:
            raise EngineClosedError("this engine was shut down; build a new one")
        if self._loop is None:
            self._loop = loop
            self.adapters.bind()
            return True
        if self._loop is not loop:
            raise EngineClosedError("this engine runs on another event loop; use it from the loop that started it")
        return False

    # Requests ---------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Check the request and return its stream; closing the stream early cancels the request."""
        self._check_open()
        ready = self.frontend.prepare(request, self.waiting.count)
        return self._stream(self._request(ready, request), ready.adapter)

    async def _stream(self, job: Any, record: RegisteredAdapter | None) -> AsyncIterator[StreamChunk]:
        """``job``'s chunks: queued (the queue may have filled since ``generate``), its adapter pinned, handed
        to the core, which counts it out of the queue from then on."""
        self.waiting.enter(self.frontend.check_queue)
        submitted = pinned = False
        try:
            if record is not None:
                self.adapters.pin(record)
                pinned = True
            next_item = await self._submit(job)
            submitted = True
            while True:
                item = await next_item()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not submitted:
                self.waiting.leave()
            await self._end(job)
            if pinned:
                self.adapters.unpin(record)

    # Adapters --------------------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str, root: str | os.PathLike | None = None) -> AdapterInfo:
        """Read, check and register an adapter (a folder or a Hub repo id) under ``name``; requests may use it
        as soon as this returns. Requests in flight are not disturbed.

        With ``root`` (the server's runtime load API), ``path`` must be a folder whose every file resolves
        inside ``root``, now and on every later read (PathOutsideAdapterRootError, 403); never a Hub id.
        """
        self._check_open()
        resolved, root = await self.adapters.locate(name, path, root)
        loop = asyncio.get_running_loop()
        read = await loop.run_in_executor(None, self._read_adapter, resolved, root)
        # The check the read made also covered the tokenizer files, read just after it.
        tokenizer = await loop.run_in_executor(None, folder_tokenizer, resolved)
        info = AdapterInfo(name=name, path=str(resolved), method=read.method, rank=read.rank, loaded_at=time.time())
        record = await self._register(info, tokenizer, root, read.data)
        self.adapters.add(record)
        self._added(record, read.data)
        return info

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for ``name`` at once, wait for its requests in flight to end, then free it."""
        self._check_open()
        await self._unregister(await self.adapters.unload(name))

    def _added(self, record: RegisteredAdapter, data: Any) -> None:
        """After ``record`` joined the registry: what the core does then (nothing, unless it says so)."""

    # What every engine answers from its front end ------------------------------------------------------

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.infos()

    def tokenizer_for(self, adapter: str | None) -> Any:
        return self.frontend.tokenizer_for(adapter)

    def prompt_ids(self, prompt: str | list[int], adapter: str | None = None) -> list[int]:
        return self.frontend.prompt_ids(prompt, adapter)

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (None if it has none)."""
        return self.frontend.tokenizer

    def stats(self) -> dict[str, float]:
        """Exactly the keys of STATS_KEYS, each a float: the front end's, and the core's (``_core_stats``)."""
        stats = EngineStats(queued_requests=self.waiting.count, adapters_loaded=len(self.list_adapters()),
                            max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras, **self._core_stats())
        return {key: float(value) for key, value in vars(stats).items()}

    # What each engine supplies (the module docstring says when each is called) ---------------------------

    @abstractmethod
    def _check_open(self) -> None:
        """EngineClosedError unless the engine can take a request or adapter call now."""

    @abstractmethod
    async def _start_core(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None:
        """Refuse new requests, end those in flight (EngineClosedError out of their streams), stop the core."""

    @abstractmethod
    def healthy(self) -> bool:
        """False once the engine can serve nothing more: shut down, or its core has died."""

    @abstractmethod
    def _request(self, ready: Prepared, request: GenerationRequest) -> Any: ...

    @abstractmethod
    async def _submit(self, job: Any) -> Callable[[], Awaitable[StreamChunk | BaseException]]:
        """Hand ``job`` to the core (EngineClosedError if it takes nothing more); the call whose every await
        is the job's next chunk, or the exception that ends it."""

    @abstractmethod
    async def _end(self, job: Any) -> None: ...

    @abstractmethod
    def _read_adapter(self, path: Path, root: Path | None) -> ReadAdapter: ...

    @abstractmethod
    async def _register(self, info: AdapterInfo, tokenizer: Any, root: Path | None, data: Any) -> RegisteredAdapter:
        """The adapter's record, registered with the core if the core needs it before the first request."""

    @abstractmethod
    async def _unregister(self, record: RegisteredAdapter) -> None: ...

    @abstractmethod
    def _core_stats(self) -> dict[str, float]:
        """The EngineStats keys that ``stats`` does not fill from the front end."""
