"""What a generation request asks of the engine, counted from its parsed body before anything is built for it.

A small body can ask for a lot: 1,000 prompts with ``n`` = 64 is 64,000 engine requests, and ``echo`` with
``logprobs`` = 20 and ``n`` = 128 is 128 copies of 21 log probabilities for every prompt token. Each count is
held against a limit the server already has, and a request over it is refused with an error that names the
field and the limit, before the work it asks for starts:

* choices (prompts x ``n``) against the engine's queue, ``EngineOptions.max_queue``: a request of more
  choices than the queue holds can never be queued whole (400); one of more than the room left in it now gets
  the full queue's 503, to retry. Counted from the body, before a prompt is tokenized or an adapter loaded.
* each prompt plus ``max_tokens`` against the context, ``max_model_len``, once per prompt as soon as its ids
  are known, rather than once per choice inside the engine.
* log probabilities (token positions over all choices x (alternatives + 1)) against what one response may
  hold, ``ServerSettings.max_response_logprobs``: a response is built from all of them at once.
"""

from __future__ import annotations

from ..engine.base import Engine
from .errors import APIError


def check_choices(engine: Engine, prompts: int, n: int) -> None:
    """``prompts`` x ``n`` engine requests fit the engine's queue: 400 beyond its size, 503 beyond its room."""
    choices = prompts * n
    what = " x ".join(([f"{prompts} prompts"] if prompts > 1 else []) + ([f"n={n}"] if n > 1 else []))
    if choices > engine.max_queue:
        raise APIError(400, f"This request asks for {choices} choices ({what}), more than the engine's queue holds "
                            f"(max_queue={engine.max_queue}); send fewer prompts per request or a smaller n.",
                       param="n" if n > 1 else "prompt", code="too_many_choices")
    room = engine.max_queue - int(engine.stats()["queued_requests"])
    if choices > room:
        raise APIError(503, f"The engine's queue has room for {max(room, 0)} more requests and this one asks for "
                            f"{choices} ({what}); retry shortly.", code="queue_full", retry_after=5)


def check_context(lengths: list[int], max_tokens: int, max_model_len: int, field: str) -> None:
    """Every prompt of ``lengths`` tokens leaves room for ``max_tokens`` in the model's context."""
    for index, length in enumerate(lengths):
        if length + max_tokens > max_model_len:
            which = f"prompt {index}" if len(lengths) > 1 else "the prompt"
            raise APIError(400, f"This model's context is {max_model_len} tokens; {which} has {length} and "
                                f"max_tokens asks for {max_tokens} more. Shorten the prompt or lower max_tokens.",
                           param=field, code="context_length_exceeded")


def check_logprobs(positions: int, alternatives: int, limit: int, field: str, remedy: str) -> None:
    """``positions`` tokens over all choices, each with its own log probability and ``alternatives`` more, fit
    in one response's ``limit``; ``remedy`` names the fields to lower."""
    asked = positions * (alternatives + 1)
    if asked > limit:
        raise APIError(400, f"This request asks for {asked:,} log probabilities ({positions:,} token positions over "
                            f"its choices x {alternatives + 1}: each token's own and {field}={alternatives} "
                            f"alternatives); one response holds at most {limit:,}. Lower {remedy}.",
                       param=field, code="too_many_logprobs")
