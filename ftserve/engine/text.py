"""Streaming text of one request, shared by every engine: incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and word-joining rules, so each step decodes a short
window ``ids[prefix:]`` and keeps only what it adds over ``ids[prefix:read]`` (the method of TGI and vLLM);
a trailing U+FFFD means a character is still incomplete and waits for the next token. The window starts
with the last few prompt tokens so the first word is joined as in the full text.

Stop strings end the text before their first occurrence and are not returned. While a request runs, the
last ``len(longest stop) - 1`` characters are held back, since they may turn out to start a stop string.
"""

from __future__ import annotations

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
