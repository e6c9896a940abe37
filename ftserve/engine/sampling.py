"""Choosing each row's next token, with OpenAI/vLLM meanings of the sampling parameters.

``temperature == 0`` is greedy (argmax). Otherwise, per row: divide the logits by the temperature, keep the
``top_k`` largest (``top_k <= 0`` keeps all), keep the smallest set of most likely tokens whose probability
sums to at least ``top_p`` (the token that crosses ``top_p`` stays, so at least one does), renormalise, and
draw from the row's own ``torch.Generator``. A request's seed fixes its generator, so its draws do not depend
on which other requests share the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SamplingParams
from .errors import RequestError


def check_params(params: SamplingParams) -> None:
    """A RequestError naming the first parameter out of range."""
    if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1; got {params.max_tokens!r}")
    if not isinstance(params.temperature, (int, float)) or not 0 <= params.temperature <= 100:
        raise RequestError(f"temperature must be a number in [0, 100]; got {params.temperature!r}")
    if not isinstance(params.top_p, (int, float)) or not 0 < params.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1]; got {params.top_p!r}")
    if isinstance(params.top_k, bool) or not isinstance(params.top_k, int):
        raise RequestError(f"top_k must be an integer (0 or -1 disables it); got {params.top_k!r}")
    if params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)):
        raise RequestError(f"seed must be an integer or None; got {params.seed!r}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise RequestError(f"stop must be a list of non-empty strings; got {params.stop!r}")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in params.stop_token_ids):
        raise RequestError(f"stop_token_ids must be a list of integers; got {params.stop_token_ids!r}")


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (None for greedy): seeded, or from fresh entropy without a seed."""
    if is_greedy(params):
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next token of every row of ``logits (rows, vocab)``."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators)):
        if not is_greedy(p):
            tokens[i] = sample_row(logits[i], p, generator)
    return tokens


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # mass before this token already suffices
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
