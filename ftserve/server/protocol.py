"""Request bodies (pydantic) and response objects in OpenAI's shapes, as vLLM serves them.

Sampling follows OpenAI's ranges: ``presence_penalty`` and ``frequency_penalty`` in [-2, 2], ``logit_bias``
maps token ids (JSON string keys) to biases in [-100, 100], ``logprobs`` (completions) and ``top_logprobs``
(chat, with ``logprobs: true``) ask for up to 20 alternatives per token. vLLM's extras are accepted too:
``top_k``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, ``min_tokens``. Completions' ``echo``
returns the prompt before the completion (and, with ``logprobs``, the prompt tokens' log probabilities
first); with ``max_tokens: 0`` only the prompt, which is how clients such as lm-evaluation-harness score text.

Lists and maps that a small body can make long, and that are copied into every engine request of a fan-out,
are bounded here, so that their cost is known once the body is parsed: ``stop`` holds up to MAX_STOP_STRINGS
strings (OpenAI's "up to 4 sequences", vLLM's ``VLLM_MAX_STOP_STRINGS``), ``stop_token_ids`` and ``logit_bias``
up to MAX_TOKEN_LIST ids. What a request asks the engine for as a whole (prompts x ``n``, log probabilities)
is counted in cost.py.

Fields OpenAI defines and this server cannot honour (``suffix``, ``best_of`` other than ``n``, ...) are
refused with a 400 that names them rather than silently ignored; fields it does not know are ignored, as
OpenAI's clients send new ones over time.
"""

from __future__ import annotations

import time
import uuid
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, StrictBool, Tag, field_validator

from ..engine.base import MAX_LOGPROBS, MIN_REPETITION_PENALTY, SEED_RANGE, SamplingParams, StructuredOutputs
from .errors import APIError
from .messages import ChatMessage, conversation
from .tools import Tool, ToolCalling, check_tools, template_tools


# JSON's types as the schema states them: pydantic's lax mode would take `true` for 1, `0` for false and "5"
# for 5. (An integer field also refuses 1.0.)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = StrictBool

MAX_STOP_STRINGS = 4
MAX_TOKEN_LIST = 1024  # stop_token_ids, logit_bias entries: each engine request of a fan-out holds a copy


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: Bool = False


class JsonSchemaFormat(_Body):
    """OpenAI's ``response_format.json_schema``: ``schema`` is the JSON schema the answer follows."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` extra: exactly one of ``json`` (a schema), ``regex``, ``choice``, ``grammar``
    (Lark or GBNF), ``json_object``. ``disable_any_whitespace``, ``disable_additional_properties`` and
    ``whitespace_pattern`` are accepted and, as in vLLM 0.32, which reads them from its engine's configuration,
    not the request's, have no effect here: whitespace is the server's ``--structured-outputs-any-whitespace``.
    ``structural_tag`` is refused (400)."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: Bool | None = None
    disable_any_whitespace: Bool = False
    disable_additional_properties: Bool = False
    whitespace_pattern: str | None = None
    structural_tag: Any = None


class _Sampling(_Body):
    """Fields shared by completions and chat, with OpenAI's ranges; top_k, repetition_penalty, stop_token_ids,
    ignore_eos and min_tokens are vLLM's extras (the official client sends them through ``extra_body``)."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    temperature: Float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    n: Int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: Annotated[Int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    top_k: Int = Field(default=-1, ge=-1)
    stop_token_ids: list[Int] = Field(default_factory=list, max_length=MAX_TOKEN_LIST)
    ignore_eos: Bool = False
    min_tokens: Int = Field(default=0, ge=0)
    presence_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: Float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=10.0)
    logit_bias: Annotated[dict[str, Float], Field(max_length=MAX_TOKEN_LIST)] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, as in OpenAI's API and vLLM; "
                             f"got {len(stops)}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value):
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers); got {key[:40]!r}")
            if len(key) > 18:  # no vocabulary comes near; and int() refuses more than 4300 digits
                raise ValueError(f"token id {key[:20]}... ({len(key)} digits) is outside every vocabulary")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100]; token {key} has {bias}")
        return value

    def refuse_unsupported(self, extra: dict[str, Any]) -> None:
        for name, value in extra.items():
            if value not in (None, False, 0, [], {}):
                raise APIError(400, f"`{name}` is not supported by this server", param=name,
                               code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "`stream_options` is only allowed when `stream` is true", param="stream_options",
                           code="invalid_value")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """Alternatives per generated token and per prompt token the engine is asked for (None: no logprobs)."""
        return None, None

    @cached_property
    def constraint(self) -> StructuredOutputs | None:
        """What ``response_format`` and ``structured_outputs`` ask the output to follow, as vLLM reads them:
        ``response_format`` json_object / json_schema, else the one constraint of ``structured_outputs``; both
        at once is a 400, as in vLLM (one constraint per request). Made once, shared by every choice."""
        fmt, extra = self.response_format, self.structured_outputs
        from_format = None
        if fmt is not None and fmt.type == "json_object":
            from_format = StructuredOutputs(json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "When response_format type is 'json_schema', the 'json_schema' field must be "
                                    "provided.", param="response_format", code="invalid_value")
            if fmt.json_schema.json_schema is None:
                raise APIError(400, "`response_format.json_schema.schema` is required: the JSON schema the answer "
                                    "follows", param="response_format.json_schema.schema", code="invalid_value")
            from_format = StructuredOutputs(json=fmt.json_schema.json_schema)
        from_extra = None
        if extra is not None:
            if extra.structural_tag is not None:
                raise APIError(400, "`structured_outputs.structural_tag` is not supported by this server",
                               param="structured_outputs.structural_tag", code="unsupported_parameter")
            kinds = {"json": extra.json_schema, "regex": extra.regex, "choice": extra.choice,
                     "grammar": extra.grammar, "json_object": extra.json_object or None}
            given = [name for name, value in kinds.items() if value is not None]
            if len(given) != 1:
                raise APIError(400, f"`structured_outputs` takes exactly one constraint of "
                                    f"{', '.join(kinds)}; got {', '.join(given) or 'none'}",
                               param="structured_outputs", code="invalid_value")
            if extra.choice is not None and (not extra.choice or any(not c for c in extra.choice)):
                raise APIError(400, "`structured_outputs.choice` must be a non-empty list of non-empty strings",
                               param="structured_outputs.choice", code="invalid_value")
            value = kinds[given[0]]
            from_extra = StructuredOutputs(**{given[0]: tuple(value) if given[0] == "choice" else value})
        if from_format is not None and from_extra is not None:
            raise APIError(400, "You can only use one kind of structured outputs constraint: `response_format` and "
                                "`structured_outputs` both give one", param="structured_outputs",
                           code="invalid_value")
        return from_format or from_extra

    def constraint_param(self) -> str:
        """The request field an engine's complaint about the constraint is about."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema":
            return "response_format.json_schema.schema"
        if fmt is not None and fmt.type == "json_object":
            return "response_format"
        extra = self.structured_outputs
        for name in ("json", "regex", "choice", "grammar"):
            if extra is not None and getattr(extra, "json_schema" if name == "json" else name) is not None:
                return f"structured_outputs.{name}"
        return "structured_outputs"

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """One choice's parameters; choice i of n with a seed uses seed + i, so the n samples differ."""
        seed = None if self.seed is None else wrap_seed(self.seed + choice)
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=seed, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty,
                              logit_bias=self.token_biases,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs, min_tokens=self.min_tokens,
                              structured_outputs=self.constraint)

    @cached_property
    def token_biases(self) -> dict[int, float]:
        """``logit_bias`` keyed by token id, made once and shared by every choice's parameters."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _prompt_shape(value: Any) -> str:
    """Which of the prompt's shapes ``value`` has, by its first item, so that only that shape is validated: a
    union tried shape by shape builds an error for every item of each wrong shape, seconds for a 4 MiB list."""
    if not isinstance(value, list) or not value:
        return "text" if not isinstance(value, list) else "texts"
    first = value[0]
    return "texts" if isinstance(first, str) else "token_lists" if isinstance(first, list) else "tokens"


Prompt = Annotated[Annotated[str, Tag("text")] | Annotated[list[str], Tag("texts")]
                   | Annotated[list[Int], Tag("tokens")] | Annotated[list[list[Int]], Tag("token_lists")],
                   Discriminator(_prompt_shape)]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[Int, Field(ge=0)] | None = None  # 0: only with echo
    echo: Bool = False
    logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Int | None = None
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
        self.refuse_unsupported({"suffix": self.suffix})
        self.constraint  # a malformed response_format / structured_outputs is a 400 before any work
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "`max_tokens` must be at least 1; 0 is allowed only with `echo` (to score the "
                                "prompt)", param="max_tokens", code="invalid_value")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "`best_of` different from `n` is not supported", param="best_of",
                           code="unsupported_parameter")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    @property
    def token_limit(self) -> int:
        """``max_tokens``, OpenAI's default 16; 0 means echo the prompt and generate nothing."""
        return 16 if self.max_tokens is None else self.max_tokens


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    add_generation_prompt: Bool = True
    logprobs: Bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}: tools.py
    parallel_tool_calls: Bool | None = True

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs", code="invalid_value")
        self.refuse_unsupported({})
        self.constraint  # a malformed response_format / structured_outputs is a 400 before any work

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)

    def template_tools(self) -> list[dict] | None:
        return template_tools(self.tools)

    def tool_calling(self, auto_enabled: bool, parser: str | None) -> ToolCalling:
        """``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked (400 naming the field), with the
        server's ``--enable-auto-tool-choice`` and ``--tool-call-parser``."""
        other = None if self.constraint is None else self.constraint_param().split(".")[0]
        return ToolCalling.of(self.tools, self.tool_choice, self.parallel_tool_calls, auto_enabled=auto_enabled,
                              parser=parser, other_constraint=other)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Body):
    """vLLM's POST /tokenize: a completion ``prompt``, or chat ``messages`` (and ``tools``) rendered with the chat
    template. ``add_special_tokens`` defaults to True for a prompt and False for messages (the template places
    them)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: Bool | None = None
    add_generation_prompt: Bool = True
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "Send exactly one of `prompt` and `messages`.", param="prompt", code="invalid_value")
        check_tools(self.tools)

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)

    def template_tools(self) -> list[dict] | None:
        return template_tools(self.tools)


class DetokenizeRequest(_Body):
    """vLLM's POST /detokenize."""

    model: str | None = None
    tokens: list[Int]


class LoadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: Bool = False


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: Int | None = None


def wrap_seed(seed: int) -> int:
    """``seed`` folded into the signed 64-bit range, so that seed + i for choice i of n stays a valid seed."""
    low, high = SEED_RANGE
    return (seed - low) % (high - low + 1) + low


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
