"""OpenAI's two shapes of log probabilities, built from the engine's ``TokenLogprobs`` as vLLM builds them.

Completions::

    {"tokens": [text, ...], "token_logprobs": [lp, ...], "top_logprobs": [{text: lp, ...}, ...],
     "text_offset": [offset, ...]}

one entry per token. ``top_logprobs[i]`` holds the chosen token, then the ``logprobs`` most likely ones, so up
to ``logprobs + 1`` entries as OpenAI documents (fewer where two tokens have the same text: a dict keeps one).
``text_offset[i]`` is the running sum of the lengths of the token texts before token i. An echoed prompt's
first token has no log probability: its ``token_logprobs`` and ``top_logprobs`` entries are None.

Chat::

    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}

with the ``top_logprobs`` most likely tokens at each position, most likely first.

A token's text is the token decoded on its own (``tokenizer.decode([id])``), as vLLM reports it, so a piece
of a multi-byte character reads as U+FFFD. A log probability of -inf is reported as -9999, which JSON carries.
"""

from __future__ import annotations

from ..engine.base import TokenLogprobs

FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprobs | None],
                        offset: int = 0) -> dict:
    """The completions object for ``token_ids``; ``offset`` is the first token's ``text_offset`` (a stream
    continues where its previous chunk ended)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = tokenizer.decode([token_id])
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_finite(entry.logprob))
        out["top_logprobs"].append({tokenizer.decode([t]): _finite(lp)
                                    for t, lp in [(token_id, entry.logprob), *entry.top]})
    return out


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
    """The chat object for generated ``token_ids``."""
    def one(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}

    return {"content": [{**one(token_id, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
                        for token_id, entry in zip(token_ids, entries, strict=True)]}
