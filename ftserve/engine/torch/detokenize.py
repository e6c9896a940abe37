"""Streaming text of one request: incremental detokenization and stop strings, on the caller's event loop.

The engine thread emits token ids only; ``TextStream.process`` gives each chunk its text as the caller reads
it (vLLM's output processor), so the model thread never decodes. A stop string ends the request there: the
chunk that completes it is the last one the caller sees (finish_reason "stop"), and the caller's closing of
the stream cancels the request, so the engine stops generating for it within a step or so; the tokens it
computed past the stop are never emitted, and ``completion_tokens`` counts only emitted ones.

Decoding token by token breaks multi-byte characters and word-joining rules, so each step decodes a short
window ``ids[prefix:]`` and keeps only what it adds over ``ids[prefix:read]`` (the method of TGI and vLLM);
a trailing U+FFFD means a character is still incomplete and waits for the next token. The window starts
with the last few prompt tokens so the first word is joined as in the full text.

Stop strings end the text before their first occurrence and are not returned. While a request runs, the
last ``len(longest stop) - 1`` characters are held back, since they may turn out to start a stop string.
"""

from __future__ import annotations

from ..base import SamplingParams, StreamChunk

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

    def process(self, chunk: StreamChunk, params: SamplingParams) -> StreamChunk:
        """Fill in the text of one engine chunk (one token); finish it with "stop" when a stop string appears
        (only once ``min_tokens`` are out, as vLLM). A stop token's own text is never part of the output."""
        if chunk.finish_reason != "stop" and self.push(chunk.token_ids[-1],
                                                       check_stop=chunk.completion_tokens >= params.min_tokens):
            chunk.finish_reason = "stop"
        chunk.text = self.take(final=chunk.finish_reason is not None)
        return chunk

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
