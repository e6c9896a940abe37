"""Streaming text of one request: incremental detokenization and stop strings, on the caller's event loop.

The engine thread emits token ids only; ``OutputStream`` (vLLM's output processor) gives each chunk its text
on the caller's event loop as the step's outputs arrive there, whether or not the caller is reading yet, so
the model thread never decodes. A stop string ends the request at once: the chunk that completes it is the
last one the caller gets (finish_reason "stop"), the engine's row is cancelled so it stops within a step or
so, and the tokens it computed past the stop are dropped, never emitted; ``completion_tokens`` counts only
emitted ones.

Decoding token by token breaks multi-byte characters and word-joining rules, so each step decodes a short
window ``ids[prefix:]`` and keeps only what it adds over ``ids[prefix:read]`` (the method of TGI and vLLM);
a trailing U+FFFD means a character is still incomplete and waits for the next token. The window starts
with the last few prompt tokens so the first word is joined as in the full text.

Stop strings end the text before their first occurrence and are not returned. While a request runs, the
last ``len(longest stop) - 1`` characters are held back, since they may turn out to start a stop string.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..base import StreamChunk

if TYPE_CHECKING:
    from .scheduler import Sequence

PROMPT_CONTEXT = 5


class TextStream:
    def __init__(self, tokenizer, prompt: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt[-PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, token: int, check_stop: bool = True) -> bool:
        """Add a generated token's text; True when a stop string appeared (the text then ends before it).
        ``check_stop`` False (before min_tokens): text only, as vLLM, which looks for stops in new text only."""
        if self.tokenizer is None:
            return False
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        found = [at for at in (self.text.find(stop, start) for stop in self.stop) if at != -1] if check_stop else []
        if found:
            self.text = self.text[:min(found)]
            return True
        return False

    def take(self, final: bool) -> str:
        """Text not yet returned; all of it at the end, otherwise all but what a stop string may still claim."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class OutputStream:
    """One request's outputs on the caller's event loop: ``put`` (from the step's delivery) fills in each
    chunk's text and queues it for the request's stream; nothing is queued after the chunk that ends it."""

    def __init__(self, seq: "Sequence", text: TextStream) -> None:
        self.seq, self.text = seq, text
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended = False

    def put(self, item: StreamChunk | Exception) -> None:
        if self.ended:  # computed after a stop string, before the engine saw the cancellation
            return
        if isinstance(item, StreamChunk):
            self._decode(item)
        self.ended = not isinstance(item, StreamChunk) or item.finish_reason is not None
        if self.ended:
            self.seq.cancelled = True  # the engine drops the row at its next step, if it has not finished it
        self.queue.put_nowait(item)

    def _decode(self, chunk: StreamChunk) -> None:
        """The text of one engine chunk (one token); "stop" when a stop string appears, once ``min_tokens``
        are out (as vLLM). The engine finishes with "stop" only on a stop token, whose text is never output."""
        if chunk.finish_reason != "stop" and self.text.push(
                chunk.token_ids[-1], check_stop=chunk.completion_tokens >= self.seq.params.min_tokens):
            chunk.finish_reason = "stop"
        chunk.text = self.text.take(final=chunk.finish_reason is not None)
