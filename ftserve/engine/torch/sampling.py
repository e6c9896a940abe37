"""Choosing each row's next token, with OpenAI/vLLM meanings of the sampling parameters.

First, for a request that asks, the logits are shaped as vLLM does: ``logit_bias`` added, then the
repetition penalty over prompt and output tokens (a positive logit divided by it, a negative one multiplied),
then the presence and frequency penalties over output tokens, and stop tokens set to -inf while the output
is shorter than ``min_tokens``. ``temperature == 0`` is greedy (argmax of the shaped logits). Otherwise, per
row: divide the logits by the temperature (at least ``MIN_TEMPERATURE``: a smaller positive temperature is
raised to it, as vLLM does, since dividing by it overflows; at 0.01 the draw is already all but greedy), keep the ``top_k`` largest (``top_k <= 0`` keeps all), keep the
smallest set of most likely tokens whose probability sums to at least ``top_p`` (the token that crosses
``top_p`` stays, so at least one does), renormalise, and draw from the row's own ``torch.Generator``. A
request's seed fixes its generator, so its draws do not depend on which other requests share the batch.
A row whose shaped scores are not finite (NaN or +inf; -inf is a ban), or whose draw fails, fails alone:
``sample`` names the cause for that row and samples the others.
A row under a structured output constraint (constrain.py) has every token its constraint does not allow next
set to -inf after that shaping, so greedy choice, temperature, top-k/top-p and seeds act among the allowed ones.
Log probabilities, when asked for, are those of the model's own logits (before shaping and temperature), as
vLLM reports them by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import MIN_TEMPERATURE, SamplingParams, TokenLogprobs


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


def shapes_logits(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0)


History = tuple[list[int], list[int], frozenset[int]]  # a row's prompt, output and banned token ids


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[History], banned: tuple[Tensor, list[bool]] | None = None,
           ) -> tuple[list[int | None], list[TokenLogprobs | None], list[str | None]]:
    """Next token of every row of ``logits (rows, vocab)``, its log probabilities where asked for, and why a
    row failed (None for the rows that did not; their token is None). ``histories``: each row's (prompt,
    output, banned) token ids, read by the penalties and min_tokens; ``banned``: the tokens the rows' structured
    output constraints ban (``(rows, vocab)`` booleans, constrain.py; none in a row without one) and whether a
    row's bans all, applied after the penalties and before temperature, top-k/top-p and greedy choice."""
    raw = logits
    failures: list[str | None] = [None] * len(params)
    shaped = [i for i, p in enumerate(params) if shapes_logits(p) or histories[i][2]]
    if shaped:
        logits = logits.clone()
        for i in shaped:
            shape_row(logits[i], params[i], *histories[i])
    if banned is not None:  # one op over the step's logits; in place unless ``raw`` is still to be read
        keep_raw = not shaped and any(p.logprobs is not None for p in params)
        logits = logits.masked_fill(banned[0], float("-inf")) if keep_raw else logits.masked_fill_(
            banned[0], float("-inf"))
        failures = ["its structured output constraint allows no token" if dead else None for dead in banned[1]]
    for i in shaped:
        failures[i] = failures[i] or unusable(logits[i])
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators)):
        if failures[i] is None and not is_greedy(p):
            tokens[i], failures[i] = sample_row(logits[i], p, generator)
    logprobs: list[TokenLogprobs | None] = [None] * len(tokens)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None and failures[i] is None]
    if wanted:
        rows = torch.log_softmax(raw[wanted].float(), dim=-1)
        for row, i in zip(rows, wanted):
            logprobs[i] = token_logprobs(row, tokens[i], params[i].logprobs)
    for i, failure in enumerate(failures):
        if failure is not None:
            tokens[i] = None
    return tokens, logprobs, failures


def unusable(scores: Tensor) -> str | None:
    """Why a row of scores cannot be sampled from (NaN, +inf, or every token banned), or None."""
    if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
        return "its penalties and logit_bias made the scores NaN or infinite"
    if bool(torch.isneginf(scores).all()):
        return "every token is banned"
    return None


def shape_row(row: Tensor, params: SamplingParams, prompt: list[int], output: list[int],
              banned: frozenset[int] = frozenset()) -> None:
    """Apply ``params``' logit bias and penalties to one row of logits, in place; ``banned`` tokens (stop tokens
    before ``min_tokens``) get -inf."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=row.device)
        row.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=row.dtype, device=row.device))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, device=row.device), minlength=row.numel()).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    if banned:
        # Only ids the row has: the engine checks requests' stop_token_ids, but a model's own eos may lie beyond
        ids = sorted(t for t in banned if 0 <= t < row.numel())
        row[torch.tensor(ids, dtype=torch.long, device=row.device)] = float("-inf")


def token_logprobs(row: Tensor, token: int, k: int) -> TokenLogprobs:
    """``token``'s entry in one row of log probabilities, with the ``k`` most likely tokens."""
    logprob = row[token]
    top = torch.topk(row, k) if k else None
    return TokenLogprobs(token_id=token, logprob=float(logprob), rank=int((row > logprob).sum()) + 1,
                         top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])


def sample_row(logits: Tensor, params: SamplingParams,
               generator: torch.Generator) -> tuple[int | None, str | None]:
    """One draw from a row, or None and why it could not be drawn."""
    scores = logits.float() / max(params.temperature, MIN_TEMPERATURE)
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # mass before this token already suffices
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return None, f"at temperature {params.temperature} the sampling probabilities are not finite"
    return int(torch.multinomial(probs, 1, generator=generator)), None
