"""The scheduler: which requests run in the next step, and what each runs (vLLM's ``schedule()``).

A step is one forward pass (runner.py) over every row that has work, all adapters mixed. ``schedule`` plans
it under a budget of ``max_num_batched_tokens``, in this order:

1. one token for every decoding row;
2. the next chunk of any prompt still being prefilled;
3. new requests, FIFO, while there are free rows, budget, KV blocks and an adapter slot for them.

A prompt larger than the budget left is cut, and the rest goes in the next steps (chunked prefill), so a long
prompt never stalls the rows that are decoding. Requests join and leave between steps; nothing waits for a
batch to drain. A request whose adapter finds no free slot lets the ones behind it pass, but only for
``STARVATION_STEPS`` steps: then nothing that needs a slot passes it until busy slots drain and it gets one.

KV blocks (kv_blocks.py) are taken as each piece needs them. When a decode or the oldest prompt cannot get
one, the newest running request is preempted by recomputation (vLLM's default): its blocks go back, it returns
to the head of the queue, and when readmitted it prefills its prompt and the output so far again (the full
blocks it had computed are usually still cached), then goes on sampling; its emitted tokens are kept, never
sent twice (so its structured output constraint, which has consumed them, stays valid). Preempting always the
newest means the oldest request always makes progress (the pool holds at least one request of
``max_model_len`` tokens). Admission leaves one spare block per running request, so newcomers do not push
running requests out at their next block.

With prefix caching, a new request first takes the cached blocks its tokens start with (named per adapter)
and prefills the rest; a request asking for prompt log probabilities computes every token itself.

The scheduler needs no model: the numbers above, the adapter cache's slots and the block pool are all it
plans with. The step plan goes to the runner (core.py runs it), its results to update.py, and ``retire`` then
frees the blocks and slots of the requests that finished or were cancelled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..base import SamplingParams, TokenLogprobs
from ..structured import Constraint
from .adapter_cache import AdapterCache, AdapterRecord
from .kv_blocks import BLOCK_SIZE, BlockPool
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
    prefill_len: int = -1  # tokens to prefill before sampling: the prompt, or prompt and output after preemption
    blocks: list[int] = field(default_factory=list)  # the block table (kv_blocks.py)
    hashes: list[bytes] = field(default_factory=list)  # names of its leading full blocks
    home: int | None = None
    in_home: bool = False
    queued: bool = True  # counted in the engine's queue (until first admitted)
    spoiled: bool = False  # its scores were not finite: its K/V may be too
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False
    blocked_steps: int = 0  # steps spent at the head of the queue without an adapter slot
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled chunk by chunk when asked for
    constraint: Constraint | None = None  # structured outputs: its matcher, advanced with each output token
    outputs: object = None  # the caller's side (detokenize.OutputStream), touched on its event loop only

    def __post_init__(self) -> None:
        if self.prefill_len < 0:
            self.prefill_len = len(self.prompt)

    def known(self) -> list[int]:
        """The tokens to prefill: the prompt, and after a preemption the output sampled before it."""
        if self.prefill_len == len(self.prompt):
            return self.prompt
        return self.prompt + self.output[:self.prefill_len - len(self.prompt)]

    @property
    def adapter_key(self) -> int:
        """Whose K/V this request computes: 0 for the base model, else its adapter's load (kv_blocks.py)."""
        return 0 if self.adapter is None else self.adapter.kv_key


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
    """Waiting and running requests of one engine (``running`` oldest first); ``dequeued()`` is called for each
    request that leaves the waiting queue for the first time (admitted, or dropped when cancelled)."""

    def __init__(self, cache: AdapterCache, max_batch: int, max_batched_tokens: int, pool: BlockPool,
                 dequeued: Callable[[], None] = lambda: None) -> None:
        self.cache, self.pool = cache, pool
        self.max_batch, self.max_batched_tokens = max_batch, max_batched_tokens
        self.dequeued = dequeued
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preempted: set[int] = set()  # ids of the requests preempted while planning this step
        # Blocks of requests whose scores were not finite, back in the pool: the runner wipes them before any
        # other request reads them, since a NaN even in a masked-out position spoils an attention row.
        self.spoiled_blocks: list[int] = []

    def schedule(self) -> StepPlan:
        """Plan the next step (decodes, prompt chunks, admissions); admitted requests join ``running``."""
        plan = StepPlan()
        self.preempted.clear()
        decodes = []
        for seq in [s for s in self.running if s.cached >= s.prefill_len]:
            if id(seq) not in self.preempted and self._reserve(seq, seq.cached + 1):
                decodes.append(seq)
        # Home-row decodes first, so the runner reads them through one view of the cache; within each kind by
        # adapter slot, so each slot's rows are one run and the LoRA term needs no row gathers (kernels.py).
        decodes.sort(key=lambda s: (not s.in_home, -1 if s.slot is None else s.slot, s.home or 0))
        for seq in decodes:
            plan.pieces.append(Piece(seq.cached, [seq.output[-1]], seq.blocks, seq.home if seq.in_home else None))
            plan.owners.append(seq)
        plan.decodes = len(plan.pieces)
        budget = self.max_batched_tokens - plan.decodes
        for seq in [s for s in self.running if s.cached < s.prefill_len]:
            if budget > 0 and id(seq) not in self.preempted:
                budget -= self._plan_prefill(seq, budget, plan, oldest=seq is self.running[0])
        plan.admitted = self._admit(budget, plan)
        if self.preempted:  # a prompt chunk of the oldest request pushed out a request planned before it
            kept = [(p, s) for p, s in zip(plan.pieces, plan.owners) if id(s) not in self.preempted]
            plan.pieces, plan.owners = [p for p, _ in kept], [s for _, s in kept]
            plan.decodes = sum(s.cached >= s.prefill_len for s in plan.owners)
        offset = 0
        for i, (piece, seq) in enumerate(zip(plan.pieces, plan.owners)):
            if seq.slot is not None:
                plan.segments.append((seq.slot, offset, len(piece.tokens)))
            offset += len(piece.tokens)
            if piece.logits != "none" and piece.start + len(piece.tokens) >= seq.prefill_len:
                plan.sampled.append(i)
        return plan

    def _plan_prefill(self, seq: Sequence, budget: int, plan: StepPlan, oldest: bool) -> int:
        """Add the next chunk of ``seq``'s prompt, at most ``budget`` tokens and what the free blocks hold (the
        oldest request preempts newer ones for one token); the tokens taken."""
        pool = self.pool
        end = min(seq.prefill_len, seq.cached + budget)
        room = (len(seq.blocks) + pool.available()) * BLOCK_SIZE - seq.cached
        end = min(end, seq.cached + room)
        if end <= seq.cached:
            if not oldest or not self._reserve(seq, seq.cached + 1):
                return 0
            end = seq.cached + 1
        pool.grow(seq, end)
        chunk = seq.known()[seq.cached:end]
        if seq.params.prompt_logprobs is not None and seq.prefill_len == len(seq.prompt):
            if seq.cached == 0:
                seq.prompt_logprobs = [None]  # the first token has no context to be predicted from
            logits = "all"
        else:
            logits = "last" if end == seq.prefill_len else "none"
        plan.pieces.append(Piece(seq.cached, chunk, seq.blocks, seq.home if seq.in_home else None, logits=logits))
        plan.owners.append(seq)
        return len(chunk)

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for ``tokens`` positions of ``seq``, preempting the newest running requests while short;
        False if ``seq`` itself, being the newest, was preempted."""
        while not self.pool.grow(seq, tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Back to the head of the queue, to prefill its prompt and output so far again (recomputation)."""
        self.pool.release(seq)
        self.pool.preemptions += 1
        self.preempted.add(id(seq))
        self.running.remove(seq)
        seq.cached = 0
        seq.prefill_len = len(seq.prompt) + len(seq.output)
        if not seq.output:
            seq.prompt_logprobs = None  # not sent yet: computed again from the start
        if seq.slot is not None:
            self.cache.slot_rows[seq.slot] -= 1
            seq.slot = None
        self.waiting.appendleft(seq)

    def _admit(self, budget: int, plan: StepPlan) -> list[Sequence]:
        """Waiting requests that start this step, FIFO, while rows, budget, blocks and adapter slots last."""
        admitted: list[Sequence] = []
        starving = False
        for seq in list(self.waiting):
            if seq.cancelled:
                self._dequeue(seq)
                continue
            if len(self.running) == self.max_batch or budget <= 0 or id(seq) in self.preempted:
                break  # (a request preempted in this step waits for the next)
            if seq.adapter is not None:
                if starving:
                    continue
                seq.slot = self.cache.acquire_slot(seq.adapter)
                if seq.slot is None:
                    seq.blocked_steps += 1
                    starving = seq.blocked_steps > STARVATION_STEPS
                    continue
            if not self._start(seq):
                seq.slot = None
                break
            if seq.slot is not None:
                self.cache.slot_rows[seq.slot] += 1
            admitted.append(seq)
            self._dequeue(seq)
            self.running.append(seq)
            budget -= self._plan_prefill(seq, budget, plan, oldest=False)
        return admitted

    def _start(self, seq: Sequence) -> bool:
        """Take ``seq``'s cached prefix and a home row, if it can get a first block beyond one spare block per
        running request; else leave it waiting, holding nothing."""
        pool = self.pool
        if pool.prefix_caching and seq.params.prompt_logprobs is None:
            seq.cached = pool.lookup(seq, seq.known(), seq.adapter_key)
        if pool.available() < len(self.running) + 1:
            pool.release(seq)
            seq.cached = 0
            return False
        pool.assign_home(seq)
        return True

    def _dequeue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        if seq.queued:
            seq.queued = False
            self.dequeued()

    def retire(self) -> list[Sequence]:
        """Name the blocks that filled up in the step (for the prefix cache), then drop finished and cancelled
        requests, returning their blocks and slots; the ones dropped."""
        if self.pool.prefix_caching:
            for seq in self.running:
                if seq.cached // BLOCK_SIZE > len(seq.hashes) and not seq.spoiled:
                    self.pool.commit(seq, seq.prompt + seq.output, seq.cached, seq.adapter_key)
        retired = [s for s in self.running if s.finished or s.cancelled]
        for seq in retired:
            freed = self.pool.release(seq, spoiled=seq.spoiled)
            if seq.spoiled:
                self.spoiled_blocks += freed
            if seq.slot is not None:
                self.cache.slot_rows[seq.slot] -= 1
        if retired:
            self.running = [s for s in self.running if not (s.finished or s.cancelled)]
        return retired
