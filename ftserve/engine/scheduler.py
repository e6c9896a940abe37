"""The engine loop: continuous batching of many requests, each with its own adapter, on one thread.

Each iteration:

1. take new requests from the inbox into the waiting queue (FIFO);
2. decode one token for every running row, all adapters in one forward pass;
3. admit waiting requests while there are free rows, a prefill token budget and an adapter slot for them
   (a request whose adapter cannot get a slot yet lets the ones behind it pass), prefill them together and
   sample their first token;
4. retire finished and cancelled rows; the last row moves into each freed row.

Requests join and leave between steps; nothing waits for a batch to drain. Outputs go back to each
request's asyncio queue through ``Sequence.emit`` (thread-safe).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter_cache import AdapterCache, AdapterRecord
from .base import SamplingParams, StreamChunk
from .detokenize import TextStream
from .errors import EngineClosedError
from .llama_runner import LlamaRunner
from .lora_slots import LoraBatch, LoraSlots
from .sampling import sample

logger = logging.getLogger("ftserve.engine")


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt: list[int]
    params: SamplingParams
    adapter: AdapterRecord | None
    emit: Callable[[object], None]
    stream: TextStream
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    cached: int = 0  # tokens in the KV cache
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False


class EngineCore:
    def __init__(self, runner: LlamaRunner, slots: LoraSlots, cache: AdapterCache, max_batch: int,
                 max_prefill_tokens: int) -> None:
        self.runner, self.slots, self.cache = runner, slots, cache
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.queued = 0  # submitted, not yet running; guarded by queued_lock
        self.queued_lock = threading.Lock()
        self.finished_requests = 0
        self.generated_tokens = 0
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="ftserve-engine", daemon=True)

    # Called from other threads -------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        self.inbox.put(("add", seq))

    def release_slot(self, record: AdapterRecord) -> None:
        self.inbox.put(("release", record))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    # The loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self.closed:
                    self._drain(block=not self.running and not self.waiting)
                    if self.closed:
                        break
                    try:
                        if self.running:
                            self._decode()
                        self._admit()
                    except Exception as exc:  # a failed step fails the requests in it, not the engine
                        logger.exception("engine step failed")
                        for seq in self.running:
                            seq.finished = True
                            self.finished_requests += 1
                            seq.emit(exc)
                    self._retire()
        finally:
            self.closed = True
            error = EngineClosedError("the engine shut down before this request finished")
            while not self.inbox.empty():
                kind, item = self.inbox.get()
                if kind == "add":
                    self.waiting.append(item)
            for seq in list(self.running) + list(self.waiting):
                seq.emit(error)
            self.running.clear()
            self.waiting.clear()

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, item = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self.waiting.append(item)
            elif kind == "release":
                self.cache.release_slot(item)
            elif kind == "stop":
                self.closed = True
                return

    def _decode(self) -> None:
        rows = self.running
        self.slots.context.batch = LoraBatch.for_rows([s.slot for s in rows], self.runner.device)
        logits = self.runner.decode([s.output[-1] for s in rows], [s.cached for s in rows])
        tokens = sample(logits, [s.params for s in rows], [s.generator for s in rows])
        for seq, token in zip(rows, tokens):
            seq.cached += 1
            self._append(seq, token)

    def _admit(self) -> None:
        free = self.max_batch - len(self.running)
        batch: list[Sequence] = []
        longest = 0
        for seq in list(self.waiting):
            if seq.cancelled:
                self._dequeue(seq)
                continue
            if len(batch) == free:
                break
            length = max(longest, len(seq.prompt))
            if batch and length * (len(batch) + 1) > self.max_prefill_tokens:
                break
            if seq.adapter is not None:
                seq.slot = self.cache.acquire_slot(seq.adapter)
                if seq.slot is None:
                    continue
                self.cache.slot_rows[seq.slot] += 1
            longest = length
            batch.append(seq)
            self._dequeue(seq)
        if not batch:
            return
        first = len(self.running)
        self.running.extend(batch)
        segments = [(s.slot, i * longest, longest) for i, s in enumerate(batch) if s.slot is not None]
        self.slots.context.batch = LoraBatch(segments, len(batch) * longest, self.runner.device)
        logits = self.runner.prefill(first, [s.prompt for s in batch])
        tokens = sample(logits, [s.params for s in batch], [s.generator for s in batch])
        for seq, token in zip(batch, tokens):
            seq.cached = len(seq.prompt)
            self._append(seq, token)

    def _dequeue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        with self.queued_lock:
            self.queued -= 1

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output.append(token)
        self.generated_tokens += 1
        finish = None
        if token in seq.stop_ids:
            finish = "stop"
        elif seq.stream.push(token):
            finish = "stop"
        elif len(seq.output) >= seq.params.max_tokens or seq.cached + 1 >= self.runner.max_len:
            finish = "length"
        seq.finished = finish is not None
        if seq.finished:
            self.finished_requests += 1  # counted before the last chunk leaves, so a reader never sees it lag
        seq.emit(StreamChunk(token_ids=[token], text=seq.stream.take(final=seq.finished), finish_reason=finish,
                             prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output)))

    def _retire(self) -> None:
        done = [i for i, s in enumerate(self.running) if s.finished or s.cancelled]
        for row in reversed(done):
            seq = self.running[row]
            if seq.slot is not None:
                self.cache.slot_rows[seq.slot] -= 1
            last = len(self.running) - 1
            if row != last:
                moved = self.running[last]
                self.runner.move_row(last, row, moved.cached)
                self.running[row] = moved
            self.running.pop()
            if not seq.finished:
                self.finished_requests += 1
