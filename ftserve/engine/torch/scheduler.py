"""The scheduler: which requests run in the next step, and what each runs (vLLM's ``schedule()``).

A step is one forward pass (runner.py) over every row that has work, all adapters mixed. ``schedule`` plans
it under a budget of ``max_num_batched_tokens``, in this order:

1. one token for every decoding row;
2. the next chunk of any prompt still being prefilled;
3. new requests, FIFO, while there are free rows, budget and an adapter slot for them.

A prompt larger than the budget left is cut, and the rest goes in the next steps (chunked prefill), so a long
prompt never stalls the rows that are decoding. Requests join and leave between steps; nothing waits for a
batch to drain. A request whose adapter finds no free slot lets the ones behind it pass, but only for
``STARVATION_STEPS`` steps: then nothing that needs a slot passes it until busy slots drain and it gets one.

The scheduler needs no model: the numbers above and the adapter cache's slots are all it plans with. The
step plan goes to the runner (core.py runs it), its results to update.py, and ``retire`` then frees the rows
that finished or were cancelled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..base import SamplingParams, TokenLogprobs
from .adapter_cache import AdapterCache, AdapterRecord
from .runner import Piece

STARVATION_STEPS = 16


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt: list[int]
    params: SamplingParams
    adapter: AdapterRecord | None
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    cached: int = 0  # tokens in the KV cache
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False
    blocked_steps: int = 0  # steps spent at the head of the queue without an adapter slot
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled chunk by chunk when asked for
    outputs: object = None  # the caller's side (detokenize.OutputStream), touched on its event loop only


@dataclass
class StepPlan:
    """One step: ``pieces`` for the runner, decodes first, then prompt chunks (``owners[i]`` owns
    ``pieces[i]``); the requests ``admitted`` this step (their first chunks are among the pieces); the LoRA
    ``segments`` ``(slot, first token, tokens)`` of the flattened step; and ``sampled``, the pieces that yield
    a next token (a decode, or a prompt's last chunk)."""

    pieces: list[Piece] = field(default_factory=list)
    owners: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    decodes: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(p.tokens) for p in self.pieces)

    @property
    def prefill_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.pieces[self.decodes:])


class Scheduler:
    """Waiting and running requests of one engine; ``dequeued()`` is called for each request that leaves the
    waiting queue (admitted, or dropped when cancelled)."""

    def __init__(self, cache: AdapterCache, max_batch: int, max_batched_tokens: int,
                 dequeued: Callable[[], None] = lambda: None) -> None:
        self.cache = cache
        self.max_batch, self.max_batched_tokens = max_batch, max_batched_tokens
        self.dequeued = dequeued
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def schedule(self) -> StepPlan:
        """Plan the next step (decodes, prompt chunks, admissions); admitted requests join ``running``."""
        plan = StepPlan()
        for row, seq in enumerate(self.running):
            if seq.cached >= len(seq.prompt):
                plan.pieces.append(Piece(row, seq.cached, [seq.output[-1]]))
                plan.owners.append(seq)
        plan.decodes = len(plan.pieces)
        budget = self.max_batched_tokens - plan.decodes
        for row, seq in enumerate(self.running):
            if seq.cached < len(seq.prompt) and budget > 0:
                budget -= self._plan_prefill(row, seq, budget, plan)
        plan.admitted = self._admit(budget)
        for seq in plan.admitted:
            self.running.append(seq)
            budget -= self._plan_prefill(len(self.running) - 1, seq, budget, plan)
        offset = 0
        for i, (piece, seq) in enumerate(zip(plan.pieces, plan.owners)):
            if seq.slot is not None:
                plan.segments.append((seq.slot, offset, len(piece.tokens)))
            offset += len(piece.tokens)
            if piece.logits != "none" and piece.start + len(piece.tokens) >= len(seq.prompt):
                plan.sampled.append(i)
        return plan

    def _plan_prefill(self, row: int, seq: Sequence, budget: int, plan: StepPlan) -> int:
        """Add the next chunk of ``seq``'s prompt, at most ``budget`` tokens; the tokens taken."""
        chunk = seq.prompt[seq.cached:seq.cached + budget]
        if seq.params.prompt_logprobs is not None:
            if seq.cached == 0:
                seq.prompt_logprobs = [None]  # the first token has no context to be predicted from
            logits = "all"
        else:
            logits = "last" if seq.cached + len(chunk) == len(seq.prompt) else "none"
        plan.pieces.append(Piece(row, seq.cached, chunk, logits=logits))
        plan.owners.append(seq)
        return len(chunk)

    def _admit(self, budget: int) -> list[Sequence]:
        """Waiting requests that start this step, FIFO, while rows, budget and adapter slots last."""
        free = self.max_batch - len(self.running)
        admitted: list[Sequence] = []
        starving = False
        for seq in list(self.waiting):
            if seq.cancelled:
                self._dequeue(seq)
                continue
            if len(admitted) == free or budget <= 0:
                break
            if seq.adapter is not None:
                if starving:
                    continue
                seq.slot = self.cache.acquire_slot(seq.adapter)
                if seq.slot is None:
                    seq.blocked_steps += 1
                    starving = seq.blocked_steps > STARVATION_STEPS
                    continue
                self.cache.slot_rows[seq.slot] += 1
            admitted.append(seq)
            budget -= len(seq.prompt)
            self._dequeue(seq)
        return admitted

    def _dequeue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.dequeued()

    def retire(self) -> tuple[list[Sequence], list[tuple[int, int, int]]]:
        """Drop finished and cancelled rows; the last row moves into each freed one. The rows dropped, and the
        moves ``(from row, to row, cached tokens)`` that the KV cache must make, in order."""
        retired, moves = [], []
        done = [i for i, s in enumerate(self.running) if s.finished or s.cancelled]
        for row in reversed(done):
            seq = self.running[row]
            if seq.slot is not None:
                self.cache.slot_rows[seq.slot] -= 1
            last = len(self.running) - 1
            if row != last:
                moved = self.running[last]
                moves.append((last, row, moved.cached))
                self.running[row] = moved
            self.running.pop()
            retired.append(seq)
        return retired, moves
