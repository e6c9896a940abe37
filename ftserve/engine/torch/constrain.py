"""Token masks of the rows that follow a structured output constraint (../structured.py), step by step.

Each constrained row's matcher says which tokens may come next: llguidance fills one bit per token for all
the step's constrained rows at once (``fill_next_token_bitmask_par``, on its own threads), the bits become a
``(rows, logits width)`` boolean mask, and the sampler (sampling.py) sets every other token's logit to -inf
after the penalties and before temperature, top-k/top-p and greedy choice. Tokens beyond the tokenizer's
vocabulary (a model's logits may be wider) are never allowed; a matcher that is done allows only the
end-of-sequence tokens. After a token is chosen, ``advance`` feeds it to the row's matcher. Rows without a
constraint cost nothing here.
"""

from __future__ import annotations

import torch

from ..structured import Constraint

BITS = 32  # tokens per word of llguidance's bitmask
_state: dict[str, object] = {}


def allowed_tokens(constraints: list[Constraint], width: int, device: torch.device) -> torch.Tensor:
    """``(len(constraints), width)`` booleans: the tokens each row's matcher allows next."""
    from llguidance.torch import fill_next_token_bitmask_par

    allowed = torch.zeros((len(constraints), width), dtype=torch.bool)
    by_vocab: dict[int, list[int]] = {}
    for i, constraint in enumerate(constraints):
        by_vocab.setdefault(constraint.vocab, []).append(i)
    for vocab, rows in by_vocab.items():
        words = torch.empty((len(rows), (vocab + BITS - 1) // BITS), dtype=torch.int32)
        fill_next_token_bitmask_par(_executor(), [(constraints[i].matcher, j) for j, i in enumerate(rows)], words)
        bits = ((words.unsqueeze(-1) >> _shifts()) & 1).view(len(rows), -1)[:, :min(vocab, width)]
        allowed[rows, :bits.shape[1]] = bits.bool()
    return allowed.to(device, non_blocking=True)


def advance(constraint: Constraint, token: int) -> str | None:
    """Feed the chosen ``token`` to the row's matcher; why it refused it, or None."""
    if constraint.matcher.consume_token(token):
        return None
    return f"the structured output constraint refused token {token}: {constraint.matcher.get_error()[:400]}"


def _executor():
    if "executor" not in _state:
        import llguidance

        _state["executor"] = llguidance.LLExecutor()
    return _state["executor"]


def _shifts() -> torch.Tensor:
    if "shifts" not in _state:
        _state["shifts"] = torch.arange(BITS, dtype=torch.int32)
    return _state["shifts"]
