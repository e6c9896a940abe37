"""Token masks of the rows that follow a structured output constraint (../structured.py), step by step.

Each constrained row's matcher says which tokens may come next: llguidance fills one bit per token for each
of the step's constrained rows, one after another on the engine thread (its parallel fill hands the rows to
threads of its own, which then compete with torch's OpenMP workers for the same cores: slower end to end on
a small machine), and numpy turns the bits into a ``(rows, logits width)`` boolean mask of the banned tokens
(single-threaded: each torch op over the step's logits is an OpenMP region, costly on a busy machine). The
sampler (sampling.py) applies it in one op, after the penalties and before temperature, top-k/top-p and
greedy choice. Tokens beyond the tokenizer's vocabulary (a model's logits may be wider) are never allowed; a
matcher that is done allows only the end-of-sequence tokens. After a token is chosen, ``advance`` feeds it to
the row's matcher. Rows without a constraint cost nothing here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..structured import Constraint

BITS = 32  # tokens per word of llguidance's bitmask


def banned_tokens(constraints: list[Constraint | None], width: int) -> np.ndarray:
    """``(len(constraints), width)`` booleans: True where a row's matcher does not allow the token next (no
    token of a row without a constraint)."""
    from llguidance.torch import fill_next_token_bitmask

    banned = np.zeros((len(constraints), width), dtype=np.bool_)
    by_vocab: dict[int, list[int]] = {}
    for i, constraint in enumerate(constraints):
        if constraint is not None:
            by_vocab.setdefault(constraint.vocab, []).append(i)
    for vocab, rows in by_vocab.items():
        words = torch.empty((len(rows), (vocab + BITS - 1) // BITS), dtype=torch.int32)
        for j, i in enumerate(rows):
            fill_next_token_bitmask(constraints[i].matcher, words, j)
        bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, count=min(vocab, width), bitorder="little")
        banned[rows, :bits.shape[1]] = bits == 0
        banned[rows, bits.shape[1]:] = True
    return banned


def advance(constraint: Constraint, token: int) -> str | None:
    """Feed the chosen ``token`` to the row's matcher; why it refused it, or None."""
    if constraint.matcher.consume_token(token):
        return None
    return f"the structured output constraint refused token {token}: {constraint.matcher.get_error()[:400]}"

