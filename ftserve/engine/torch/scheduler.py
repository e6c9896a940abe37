"""The engine loop: continuous batching of many requests, each with its own adapter, on one thread.

Each iteration is one forward pass (runner.py) over every row that has work, all adapters mixed:

1. take new requests from the inbox into the waiting queue (FIFO);
2. plan the step under a budget of ``max_num_batched_tokens``: one token for every decoding row, then the
   next chunk of any prompt still being prefilled, then new requests while there are free rows, budget and
   an adapter slot for them (chunked prefill: a prompt larger than the budget left is cut, and the rest
   goes in the next steps, so a long prompt never stalls the rows that are decoding);
3. run the step and sample a token for every decode and every prompt whose last chunk ran;
4. retire finished and cancelled rows; the last row moves into each freed row;
5. hand the step's outputs to the caller's event loop in one call.

Requests join and leave between steps; nothing waits for a batch to drain. A request whose adapter finds no
free slot lets the ones behind it pass, but only for ``STARVATION_STEPS`` steps: then nothing that needs a
slot passes it until busy slots drain and it gets one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..base import SamplingParams, StreamChunk, TokenLogprobs
from ..errors import EngineClosedError, GenerationError, SamplingError
from .adapter_cache import AdapterCache, AdapterRecord
from .detokenize import TextStream
from .lora_slots import LoraBatch, LoraSlots
from .runner import Piece, Runner
from .sampling import sample, token_logprobs

logger = logging.getLogger("ftserve.engine")


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    prompt: list[int]
    params: SamplingParams
    adapter: AdapterRecord | None
    stream: TextStream
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    cached: int = 0  # tokens in the KV cache
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False
    blocked_steps: int = 0  # steps spent at the head of the queue without an adapter slot
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled chunk by chunk when asked for
    outputs: object = None  # where the caller reads chunks (an asyncio.Queue); the deliver callback knows it


STARVATION_STEPS = 16


class EngineCore:
    """``deliver(items)`` takes a step's ``(sequence, chunk or exception)`` pairs from the engine thread."""

    def __init__(self, runner: Runner, slots: LoraSlots, cache: AdapterCache, max_batch: int,
                 max_batched_tokens: int, deliver: Callable[[list[tuple[Sequence, object]]], None]) -> None:
        self.runner, self.slots, self.cache = runner, slots, cache
        self.max_batch, self.max_batched_tokens = max_batch, max_batched_tokens
        self.deliver = deliver
        self.outbox: list[tuple[Sequence, object]] = []
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.queued = 0  # submitted, not yet running; guarded by queued_lock
        self.queued_lock = threading.Lock()
        self.finished_requests = 0
        self.generated_tokens = 0
        self.steps = 0
        self.prefill_tokens = 0
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
                        self._step()
                    except Exception as exc:  # a failed step fails the requests in it, not the engine
                        logger.exception("engine step failed")
                        for seq in self.running:
                            if not seq.finished:
                                self._fail(seq, exc)
                    self._retire()
                    self._flush()
        finally:
            self.closed = True
            error = EngineClosedError("the engine shut down before this request finished")
            while not self.inbox.empty():
                kind, item = self.inbox.get()
                if kind == "add":
                    self.waiting.append(item)
            self.outbox += [(seq, error) for seq in list(self.running) + list(self.waiting)]
            self.running.clear()
            self.waiting.clear()
            self._flush()

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

    def _flush(self) -> None:
        if self.outbox:
            items, self.outbox = self.outbox, []
            self.deliver(items)

    def _step(self) -> None:
        """Plan one step (decodes, prompt chunks, admissions), run it, sample."""
        pieces: list[Piece] = []
        owners: list[Sequence] = []
        for row, seq in enumerate(self.running):
            if seq.cached >= len(seq.prompt):
                pieces.append(Piece(row, seq.cached, [seq.output[-1]]))
                owners.append(seq)
        budget = self.max_batched_tokens - len(pieces)
        for row, seq in enumerate(self.running):
            if seq.cached < len(seq.prompt) and budget > 0:
                budget -= self._plan_prefill(row, seq, budget, pieces, owners)
        for seq in self._admit(budget):
            self.running.append(seq)
            budget -= self._plan_prefill(len(self.running) - 1, seq, budget, pieces, owners)
        if not pieces:
            return
        self.steps += 1
        segments, offset = [], 0
        for piece, seq in zip(pieces, owners):
            if seq.slot is not None:
                segments.append((seq.slot, offset, len(piece.tokens)))
            offset += len(piece.tokens)
        self.slots.context.batch = LoraBatch(segments, offset, self.runner.device)
        logits = self.runner.forward(pieces)
        picked, sampled, cursor = [], [], 0
        for piece, seq in zip(pieces, owners):
            if piece.logits == "all":
                self._prompt_logprobs(seq, piece, logits[cursor:cursor + len(piece.tokens)])
            cursor += piece.logit_rows
            seq.cached = piece.start + len(piece.tokens)
            if piece.logits != "none" and seq.cached >= len(seq.prompt):  # a decode, or a prompt's last chunk
                picked.append(cursor - 1)
                sampled.append(seq)
        if len(picked) < logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(picked, dtype=torch.long, device=logits.device))
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        if not all(finite):  # an adapter (or the base) overflowed on some rows: fail those, sample the rest
            for ok, seq in zip(finite, sampled):
                if not ok:
                    self._fail(seq, GenerationError(_overflow_message(seq, self.runner.dtype)))
            keep = [i for i, ok in enumerate(finite) if ok]
            logits = logits[keep]
            sampled = [sampled[i] for i in keep]
        tokens, logprobs, failures = sample(
            logits, [s.params for s in sampled], [s.generator for s in sampled],
            [(s.prompt, s.output, s.stop_ids if len(s.output) < s.params.min_tokens else frozenset())
             for s in sampled])
        for seq, token, logprob, failure in zip(sampled, tokens, logprobs, failures):
            if failure is None:
                self._append(seq, token, logprob)
            else:  # this request's sampling parameters broke its own draw; the rows beside it go on
                self._fail(seq, SamplingError(f"cannot choose the next token after {len(seq.output)} generated "
                                              f"tokens: {failure}"))

    def _prompt_logprobs(self, seq: Sequence, piece: Piece, logits: torch.Tensor) -> None:
        """Log probabilities of the prompt tokens that follow each of ``piece``'s tokens."""
        targets = seq.prompt[piece.start + 1:piece.start + 1 + len(piece.tokens)]
        rows = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
        seq.prompt_logprobs += [token_logprobs(row, token, seq.params.prompt_logprobs)
                                for row, token in zip(rows, targets)]

    def _plan_prefill(self, row: int, seq: Sequence, budget: int, pieces: list[Piece], owners: list[Sequence]) -> int:
        """Add the next chunk of ``seq``'s prompt, at most ``budget`` tokens; the tokens taken."""
        chunk = seq.prompt[seq.cached:seq.cached + budget]
        if seq.params.prompt_logprobs is not None:
            if seq.cached == 0:
                seq.prompt_logprobs = [None]  # the first token has no context to be predicted from
            logits = "all"
        else:
            logits = "last" if seq.cached + len(chunk) == len(seq.prompt) else "none"
        pieces.append(Piece(row, seq.cached, chunk, logits=logits))
        owners.append(seq)
        self.prefill_tokens += len(chunk)
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
        with self.queued_lock:
            self.queued -= 1

    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        seq.output.append(token)
        self.generated_tokens += 1
        finish = None
        if token in seq.stop_ids:
            finish = "stop"
        elif seq.stream.push(token, check_stop=len(seq.output) >= seq.params.min_tokens):
            finish = "stop"
        elif len(seq.output) >= seq.params.max_tokens or seq.cached + 1 >= self.runner.max_len:
            finish = "length"
        seq.finished = finish is not None
        if seq.finished:
            self.finished_requests += 1  # counted before the last chunk leaves, so a reader never sees it lag
        self.outbox.append((seq, StreamChunk(
            token_ids=[token], text=seq.stream.take(final=seq.finished), finish_reason=finish,
            prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output),
            logprobs=None if logprobs is None else [logprobs],
            prompt_logprobs=seq.prompt_logprobs if len(seq.output) == 1 else None)))

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.finished = True
        self.finished_requests += 1
        self.outbox.append((seq, error))

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


def _overflow_message(seq: Sequence, dtype: torch.dtype) -> str:
    where = f"adapter {seq.adapter.info.name!r}" if seq.adapter is not None else "the base model"
    return (f"the next-token scores of this request are not finite (NaN or infinity) after "
            f"{len(seq.output)} generated tokens: {where} overflows in {dtype}; check the adapter's weights "
            f"(or serve in float32)")
