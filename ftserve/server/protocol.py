"""Request bodies (pydantic) and response objects in OpenAI's shapes, as vLLM serves them.

Fields OpenAI defines and this server cannot honour (logprobs, tools, penalties, ...) are refused with a 400
that names them rather than silently ignored; fields it does not know are ignored, as OpenAI's clients send
new ones over time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.base import SamplingParams
from .errors import APIError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat, with OpenAI's ranges; top_k, stop_token_ids and ignore_eos are
    vLLM's extras (the official client sends them through ``extra_body``)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(default=-1, ge=-1)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def refuse_unsupported(self, extra: dict[str, Any]) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"`{name}` is not supported by this server; leave it at 0", param=name,
                               code="unsupported_parameter")
        if self.logit_bias:
            raise APIError(400, "`logit_bias` is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        for name, value in extra.items():
            if value not in (None, False, 0, [], {}):
                raise APIError(400, f"`{name}` is not supported by this server", param=name,
                               code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "`stream_options` is only allowed when `stream` is true", param="stream_options",
                           code="invalid_value")

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """One choice's parameters; choice i of n with a seed uses seed + i, so the n samples differ."""
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=seed, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "`prompt` must not be empty", param="prompt", code="invalid_value")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def check(self) -> None:
        self.refuse_unsupported({"echo": self.echo, "logprobs": self.logprobs, "suffix": self.suffix})
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "`best_of` different from `n` is not supported", param="best_of",
                           code="unsupported_parameter")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported (got type {part.get('type')!r})",
                               param=f"messages.{index}.content", code="unsupported_content")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        extra = {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs, "tools": self.tools}
        if self.tool_choice not in (None, "none", "auto"):
            extra["tool_choice"] = self.tool_choice
        if self.response_format and self.response_format.get("type") != "text":
            extra["response_format"] = self.response_format
        self.refuse_unsupported(extra)

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class LoadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


# Responses --------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, root: str, parent: str | None = None,
               max_model_len: int | None = None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "ftserve", "root": root,
            "parent": parent, "permission": []}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card
