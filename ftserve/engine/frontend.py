"""What every engine shares in front of its core: a request to token ids, the request checks, the adapters.

vLLM's v1 engine splits the same way: an input processor (prompt -> ids, checks) before the core, and the
core only runs what it is handed. Here ``Frontend.prepare`` turns a request into a ``Prepared`` one (ids
once, with the tokenizer its adapter picks) or raises the RequestError that says what was wrong; the
server asks ``prompt_ids`` for the same ids (``echo``). ``AdapterRegistry`` holds every loaded adapter's
name, info, tokenizer and pins, and the load/unload bookkeeping; what an engine keeps per adapter (factors,
a slot) sits on its own subclass of ``RegisteredAdapter``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files.hub import resolve_folder
from .base import AdapterInfo, GenerationRequest
from .params import check_params
from .errors import (AdapterExistsError, AdapterLoadError, ContextLengthError, QueueFullError, RequestError,
                     UnknownAdapterError)


@dataclass(eq=False)
class RegisteredAdapter:
    """A loaded adapter as every engine sees it; ``pins``: requests using it, from submission to their end."""

    info: AdapterInfo
    tokenizer: Any = None
    root: Path | None = None  # every read of the folder stays inside it; None: trusted (given at startup)
    pins: int = 0
    unloading: bool = False


@dataclass
class Prepared:
    """A checked request: its prompt ids, the tokenizer that made them (None without one), its adapter."""

    prompt: list[int]
    tokenizer: Any
    adapter: RegisteredAdapter | None
    stop_ids: frozenset[int]


class AdapterRegistry:
    """Adapter names and their records. A name being unloaded is refused to new requests at once, and freed
    when its last pinned request ends (``drained``)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.records: dict[str, RegisteredAdapter] = {}
        self.unpinned: asyncio.Event | None = None  # set whenever some adapter's last pin goes

    def bind(self) -> None:
        """Called on the event loop that serves the engine."""
        self.unpinned = asyncio.Event()

    def infos(self) -> list[AdapterInfo]:
        return [r.info for r in self.records.values() if not r.unloading]

    def tokenizer_for(self, adapter: str | None, base: Any) -> Any:
        record = self.records.get(adapter) if adapter else None
        return record.tokenizer if record is not None and record.tokenizer is not None else base

    def lookup(self, adapter: str | None) -> RegisteredAdapter | None:
        """The record a request's ``adapter`` names; None for the base model."""
        if adapter is None or adapter == self.model_name:
            return None
        record = self.records.get(adapter)
        if record is None or record.unloading:
            state = f"adapter {adapter!r} is being unloaded" if record else f"no adapter named {adapter!r} is loaded"
            loaded = sorted(info.name for info in self.infos())
            raise UnknownAdapterError(f"{state}; loaded: {loaded or 'none'} (or {self.model_name!r}, the base model)")
        return record

    def pin(self, record: RegisteredAdapter) -> None:
        if record.unloading or self.records.get(record.info.name) is not record:
            raise UnknownAdapterError(f"adapter {record.info.name!r} was unloaded")
        record.pins += 1

    def unpin(self, record: RegisteredAdapter) -> None:
        record.pins -= 1
        if record.pins == 0:
            self.unpinned.set()

    # Loading and unloading ------------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name == self.model_name:
            raise AdapterLoadError(f"adapter name {name!r} is empty or is the base model's name")
        if name in self.records:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded; unload it first")

    async def locate(self, name: str, path: str, root: str | os.PathLike | None) -> tuple[Path, Path | None]:
        """Check ``name``, then find the folder: a local one, or a Hub repo id fetched (never with a root, as
        an absolute name is never taken for a repo id). The engine reads it under the returned root."""
        self.check_name(name)
        if root is not None:
            root = Path(os.path.realpath(root))
            path = os.path.abspath(path)
        loop = asyncio.get_running_loop()
        resolved = await loop.run_in_executor(None, resolve_adapter_path, str(path))
        return resolved, root

    def add(self, record: RegisteredAdapter) -> None:
        """Register a read and checked adapter; requests may use it at once."""
        if record.info.name in self.records:  # loaded under the same name while this one was read
            raise AdapterExistsError(f"an adapter named {record.info.name!r} is already loaded; unload it first")
        self.records[record.info.name] = record

    async def unload(self, name: str) -> RegisteredAdapter:
        """Refuse new requests for ``name`` now, wait for those in flight, drop it; the record, to free."""
        record = self.records.get(name)
        if record is None or record.unloading:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        record.unloading = True
        while record.pins:
            self.unpinned.clear()
            await self.unpinned.wait()
        del self.records[name]
        return record


class Frontend:
    """Checks and tokenizes requests for an engine of ``vocab_size`` tokens and ``max_model_len`` positions."""

    def __init__(self, tokenizer: Any, *, model_name: str, vocab_size: int, max_model_len: int, max_queue: int,
                 eos_ids: frozenset[int]) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name
        self.vocab_size, self.max_model_len, self.max_queue = vocab_size, max_model_len, max_queue
        self.eos_ids = eos_ids
        self.adapters = AdapterRegistry(model_name)

    def tokenizer_for(self, adapter: str | None) -> Any:
        """The tokenizer (and chat template) of a request's model: an adapter's own wins over the base's."""
        return self.adapters.tokenizer_for(adapter, self.tokenizer)

    def prepare(self, request: GenerationRequest, queued: int) -> Prepared:
        """``request`` checked against the vocabulary, its adapter, the context and the queue (``queued``
        requests waiting now), with its prompt as ids. Sampling parameters are checked first."""
        params = request.params
        check_params(params)
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if not self.in_vocabulary(ids):
                outside = [t for t in ids if not 0 <= t < self.vocab_size]
                raise RequestError(f"{name} names token ids {outside[:5]} outside this model's vocabulary "
                                   f"(0 .. {self.vocab_size - 1})")
        record = self.adapters.lookup(request.adapter)
        tokenizer = self.tokenizer_for(request.adapter)
        if params.stop and tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this engine was built without one")
        prompt = self.prompt_ids(request.prompt, request.adapter)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ContextLengthError(f"this model's context is {self.max_model_len} tokens; the prompt has "
                                     f"{len(prompt)} and max_tokens asks for {params.max_tokens} more. Shorten the "
                                     f"prompt or lower max_tokens")
        self.check_queue(queued)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        return Prepared(prompt, tokenizer, record, frozenset(stop_ids))

    def prompt_ids(self, prompt: str | list[int], adapter: str | None = None) -> list[int]:
        """A prompt's token ids as the engine runs them: a string tokenized by its model's tokenizer, ids
        checked against the vocabulary."""
        if isinstance(prompt, str):
            tokenizer = self.tokenizer_for(adapter)
            if tokenizer is None:
                raise RequestError("this engine has no tokenizer; send the prompt as token ids")
            ids = list(tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and set(map(type, prompt)) <= {int}:  # not bool, whose type is bool
            ids = list(prompt)
        else:
            raise RequestError(f"prompt must be a string or a list of token ids; got {type(prompt).__name__}")
        if not ids:
            raise RequestError("the prompt is empty")
        if not self.in_vocabulary(ids):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise RequestError(f"token ids {bad[:5]} are outside this model's vocabulary (0 .. {self.vocab_size - 1})")
        return ids

    def in_vocabulary(self, ids) -> bool:
        """Whether every id of ``ids`` names a token of the vocabulary; at C speed, since a fan-out's every
        engine request is checked on the event loop."""
        return not ids or (min(ids) >= 0 and max(ids) < self.vocab_size)

    def check_queue(self, queued: int) -> None:
        if queued >= self.max_queue:
            raise QueueFullError(f"{queued} requests are already waiting (max_queue={self.max_queue}); retry later")


def resolve_adapter_path(path: str) -> Path:
    """A local folder as is; otherwise a Hugging Face Hub repo id, fetched (or found in the local hub cache)."""
    return resolve_folder(path, "adapter", error=AdapterLoadError)


def folder_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer (and chat template) a model or adapter folder ships, or None."""
    if not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
