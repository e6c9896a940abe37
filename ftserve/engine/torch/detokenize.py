"""Streaming text of one request on the caller's event loop: ``OutputStream`` over the shared ``TextStream``.

The engine thread emits token ids only; ``OutputStream`` (vLLM's output processor) gives each chunk its text
on the caller's event loop as the step's outputs arrive there, whether or not the caller is reading yet, so
the model thread never decodes. A stop string ends the request at once: the chunk that completes it is the
last one the caller gets (finish_reason "stop"), the engine's row is cancelled so it stops within a step or
so, and the tokens it computed past the stop are dropped, never emitted; ``completion_tokens`` counts only
emitted ones. Detokenizing and stop strings themselves are ``TextStream``'s (../text.py), which every
engine uses.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..base import StreamChunk
from ..text import TextStream

if TYPE_CHECKING:
    from .scheduler import Sequence


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
