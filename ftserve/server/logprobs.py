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
of a multi-byte character reads as U+FFFD. Its chat ``bytes`` are the token's own raw bytes instead
(``token_bytes``), which OpenAI documents as "useful when characters are represented by multiple tokens and
their byte representations must be combined": joined over an answer they are its UTF-8 text exactly. A log
probability of -inf is reported as -9999, which JSON carries.
"""

from __future__ import annotations

import json
import re
import weakref

from ..engine.base import TokenLogprobs

FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)


def _decoder(tokenizer):
    """``decode([id])`` remembered per id: the alternatives at each position are mostly the same few tokens,
    and a response can hold a million of them."""
    texts: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in texts:
            texts[token_id] = tokenizer.decode([token_id])
        return texts[token_id]

    return text


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprobs | None],
                        offset: int = 0) -> dict:
    """The completions object for ``token_ids``; ``offset`` is the first token's ``text_offset`` (a stream
    continues where its previous chunk ended)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    decode = _decoder(tokenizer)
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = decode(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_finite(entry.logprob))
        out["top_logprobs"].append({decode(t): _finite(lp)
                                    for t, lp in [(token_id, entry.logprob), *entry.top]})
    return out


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprobs]) -> dict:
    """The chat object for generated ``token_ids``."""
    decode = _decoder(tokenizer)

    def one(token_id: int, logprob: float) -> dict:
        return {"token": decode(token_id), "logprob": _finite(logprob),
                "bytes": list(token_bytes(tokenizer, token_id))}

    return {"content": [{**one(token_id, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
                        for token_id, entry in zip(token_ids, entries, strict=True)]}


# Raw bytes of a token -------------------------------------------------------------------------------------

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces
_BYTE_LEVEL: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: byte-level BPE spells every byte as one printable
    character (printable Latin-1 as itself, the other bytes as U+0100 onwards, in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


UNICODE_TO_BYTE = _unicode_to_byte()


def _is_byte_level(tokenizer) -> bool:
    """True when the tokenizer's decoder is byte-level (GPT-2, Llama 3, Qwen and the tests' tokenizer)."""
    try:
        return _BYTE_LEVEL[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    found = backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))
    try:
        _BYTE_LEVEL[tokenizer] = found
    except TypeError:  # not weakly referenceable: asked again next time
        pass
    return found


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes ``token_id`` stands for, even when it is only part of a character.

    Byte-level BPE tokens map back exactly through the inverse of GPT-2's byte alphabet; SentencePiece's
    ``<0xNN>`` byte-fallback pieces are that byte; special tokens, and tokens of other tokenizers (whole
    characters), are their decoded text in UTF-8.
    """
    if token_id not in getattr(tokenizer, "all_special_ids", ()):
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and piece:
            if _is_byte_level(tokenizer) and all(ch in UNICODE_TO_BYTE for ch in piece):
                return bytes(UNICODE_TO_BYTE[ch] for ch in piece)
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
    return tokenizer.decode([int(token_id)]).encode("utf-8")
