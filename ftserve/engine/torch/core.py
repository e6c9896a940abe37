"""The engine loop: continuous batching of many requests, each with its own adapter, on one thread.

Each iteration of ``EngineCore._loop`` is one step, in three parts as in vLLM's v1 engine:

1. ``Scheduler.schedule()`` (scheduler.py) takes the waiting and running requests and returns a ``StepPlan``:
   the decodes, prompt chunks and admissions of this step under the token budget, and their LoRA segments;
2. ``execute(plan)`` runs it: one forward pass (runner.py) over every piece, all adapters mixed, giving the
   logits the plan asks for;
3. ``sample_step`` and ``update`` (update.py) choose the next tokens, append them, find the requests that end,
   and emit their chunks; then the scheduler retires finished and cancelled requests (their KV blocks go
   back to the pool, kv_blocks.py), and the step's outputs go to the caller's event loop in one call.

A failed step fails the requests in it, not the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch

from ..base import StreamChunk
from ..errors import EngineClosedError, GenerationError
from .adapter_cache import AdapterCache, AdapterRecord
from .kv_blocks import BlockPool
from .lora_slots import LoraBatch, LoraSlots
from .runner import Runner
from .scheduler import Scheduler, Sequence, StepPlan
from .update import sample_step, update

logger = logging.getLogger("ftserve.engine")


class EngineCore:
    """``deliver(items)`` takes a step's ``(sequence, chunk or exception)`` pairs from the engine thread;
    ``dequeued()`` is called there for each submitted request that leaves the queue (the scheduler's)."""

    def __init__(self, runner: Runner, slots: LoraSlots, cache: AdapterCache, pool: BlockPool, max_batch: int,
                 max_batched_tokens: int, deliver: Callable[[list[tuple[Sequence, object]]], None],
                 dequeued: Callable[[], None]) -> None:
        self.runner, self.slots, self.cache, self.pool = runner, slots, cache, pool
        self.scheduler = Scheduler(cache, max_batch, max_batched_tokens, pool, dequeued=dequeued)
        self.deliver = deliver
        self.outbox: list[tuple[Sequence, object]] = []
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.finished_requests = 0
        self.generated_tokens = 0
        self.steps = 0
        self.prefill_tokens = 0
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="ftserve-engine", daemon=True)

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    # Called from other threads -------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        self.inbox.put(("add", seq))

    def release_slot(self, record: AdapterRecord) -> None:
        self.inbox.put(("release", record))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    # The loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.scheduler
        try:
            with torch.inference_mode():
                while not self.closed:
                    self._drain(block=not scheduler.running and not scheduler.waiting)
                    if self.closed:
                        break
                    try:
                        self._step()
                    except Exception as exc:  # a failed step fails the requests in it, not the engine
                        logger.exception("engine step failed")
                        for seq in scheduler.running:
                            if not seq.finished:
                                self._fail(seq, exc)
                    retired = scheduler.retire()
                    if scheduler.spoiled_blocks:
                        self.runner.wipe(scheduler.spoiled_blocks)
                        scheduler.spoiled_blocks = []
                    self.finished_requests += sum(not seq.finished for seq in retired)
                    self._flush()
        finally:
            self.closed = True
            error = EngineClosedError("the engine shut down before this request finished")
            while not self.inbox.empty():
                kind, item = self.inbox.get()
                if kind == "add":
                    scheduler.waiting.append(item)
            self.outbox += [(seq, error) for seq in list(scheduler.running) + list(scheduler.waiting)]
            scheduler.running.clear()
            scheduler.waiting.clear()
            self._flush()

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        if not plan.pieces:
            return
        self.steps += 1
        self.prefill_tokens += plan.prefill_tokens
        logits = self.execute(plan)
        outcomes = sample_step(plan, logits, self.runner.dtype)
        for seq, token, _ in outcomes:
            seq.spoiled |= isinstance(token, GenerationError)
        update(plan, outcomes, self.runner.max_len, self._emit)

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run ``plan``'s pieces, all adapters mixed, in one forward; the logits its pieces ask for."""
        self.slots.context.batch = LoraBatch(plan.segments, plan.tokens, self.runner.device)
        return self.runner.forward(plan.pieces)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, item = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self.scheduler.waiting.append(item)
            elif kind == "release":  # an unloaded adapter: its slot, and its blocks in the prefix cache
                self.cache.release_slot(item)
                self.pool.invalidate(item.kv_key)
            elif kind == "stop":
                self.closed = True
                return

    def _emit(self, seq: Sequence, item: StreamChunk | Exception) -> None:
        if isinstance(item, StreamChunk):
            self.generated_tokens += 1
        if isinstance(item, Exception) or item.finish_reason is not None:
            self.finished_requests += 1  # counted before the last chunk leaves, so a reader never sees it lag
        self.outbox.append((seq, item))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.finished = True
        self._emit(seq, error)

    def _flush(self) -> None:
        if self.outbox:
            items, self.outbox = self.outbox, []
            self.deliver(items)
