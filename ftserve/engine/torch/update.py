"""Applying an executed step to its requests (vLLM's ``update_from_output``).

``sample_step`` reads the step's logits: prompt log probabilities where asked, then one next token for every
piece the plan samples, masked to what its structured output constraint allows if it has one (constrain.py;
the chosen token then advances the constraint). A row whose scores are not finite (an adapter, or the base,
overflowed), or whose own sampling parameters or constraint break its draw, fails alone; the rows beside it
go on. ``update`` then advances each row's KV cache length, appends the tokens, finds the requests that end (a
stop token, ``max_tokens``, the context length) and emits one chunk per token, or the row's error. Chunks
carry token ids; their text, and stop strings, are the caller's (detokenize.py), off this thread.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..base import StreamChunk, TokenLogprobs
from ..errors import GenerationError, SamplingError
from .constrain import advance, banned_tokens
from .runner import Piece
from .sampling import sample, token_logprobs
from .scheduler import Sequence, StepPlan

Outcome = tuple[Sequence, int | Exception, TokenLogprobs | None]  # a row's token (or error) and its logprobs
Emit = Callable[[Sequence, StreamChunk | Exception], None]


def sample_step(plan: StepPlan, logits: torch.Tensor, dtype: torch.dtype) -> list[Outcome]:
    """Prompt log probabilities where asked, and the outcome of every sampled piece: rows whose scores are not
    finite first, then the others in plan order."""
    picked, cursor, wanted = [], 0, set(plan.sampled)
    for i, (piece, seq) in enumerate(zip(plan.pieces, plan.owners)):
        if piece.logits == "all":
            _prompt_logprobs(seq, piece, logits[cursor:cursor + len(piece.tokens)])
        cursor += piece.logit_rows
        if i in wanted:
            picked.append(cursor - 1)
    sampled = [plan.owners[i] for i in plan.sampled]
    if len(picked) < logits.shape[0]:
        logits = logits.index_select(0, torch.tensor(picked, dtype=torch.long, device=logits.device))
    outcomes: list[Outcome] = []
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    if not all(finite):  # fail those rows, sample the rest
        outcomes += [(seq, GenerationError(_overflow_message(seq, dtype)), None)
                     for ok, seq in zip(finite, sampled) if not ok]
        keep = [i for i, ok in enumerate(finite) if ok]
        logits = logits[keep]
        sampled = [sampled[i] for i in keep]
    banned = None
    if any(s.constraint is not None for s in sampled):
        banned = banned_tokens([s.constraint for s in sampled], logits.shape[-1])
        banned = (torch.from_numpy(banned).to(logits.device, non_blocking=True), banned.all(1).tolist())
    tokens, logprobs, failures = sample(
        logits, [s.params for s in sampled], [s.generator for s in sampled],
        [(s.prompt, s.output, s.stop_ids if len(s.output) < s.params.min_tokens else frozenset()) for s in sampled],
        banned)
    for seq, token, logprob, failure in zip(sampled, tokens, logprobs, failures):
        if failure is None and seq.constraint is not None and token not in seq.stop_ids:
            failure = advance(seq.constraint, token)
        if failure is None:
            outcomes.append((seq, token, logprob))
        else:
            outcomes.append((seq, SamplingError(f"cannot choose the next token after {len(seq.output)} generated "
                                                f"tokens: {failure}"), None))
    return outcomes


def update(plan: StepPlan, outcomes: list[Outcome], max_len: int, emit: Emit) -> None:
    """Apply ``outcomes`` of the step ``plan``: cache lengths, tokens, finishes; ``emit`` each row's chunk or
    error, in order. A request that ends is marked ``finished`` before its last chunk is emitted."""
    for piece, seq in zip(plan.pieces, plan.owners):
        seq.cached = piece.start + len(piece.tokens)
    for seq, token, logprobs in outcomes:
        if isinstance(token, Exception):
            seq.finished = True
            emit(seq, token)
            continue
        seq.output.append(token)
        finish = None
        if token in seq.stop_ids:
            finish = "stop"
        elif len(seq.output) >= seq.params.max_tokens or seq.cached + 1 >= max_len:
            finish = "length"
        seq.finished = finish is not None
        emit(seq, StreamChunk(
            token_ids=[token], text="", finish_reason=finish,
            prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output),
            logprobs=None if logprobs is None else [logprobs],
            prompt_logprobs=seq.prompt_logprobs if len(seq.output) == 1 else None))


def _prompt_logprobs(seq: Sequence, piece: Piece, logits: torch.Tensor) -> None:
    """Log probabilities of the prompt tokens that follow each of ``piece``'s tokens."""
    targets = seq.prompt[piece.start + 1:piece.start + 1 + len(piece.tokens)]
    rows = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
    seq.prompt_logprobs += [token_logprobs(row, token, seq.params.prompt_logprobs)
                            for row, token in zip(rows, targets)]


def _overflow_message(seq: Sequence, dtype: torch.dtype) -> str:
    where = f"adapter {seq.adapter.info.name!r}" if seq.adapter is not None else "the base model"
    return (f"the next-token scores of this request are not finite (NaN or infinity) after "
            f"{len(seq.output)} generated tokens: {where} overflows in {dtype}; check the adapter's weights "
            f"(or serve in float32)")
