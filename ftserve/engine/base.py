"""The interface every engine implements and the server calls. Engines differ; requests and streams do not."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output, vLLM's ``StructuredOutputsParams``: exactly one of ``json`` (a JSON schema, as
    a dict or its JSON text), ``regex``, ``choice`` (the output is one of these strings), ``grammar`` (Lark, or
    GBNF as llama.cpp writes it), ``json_object`` (any JSON object). The output is decoded under it: each step's
    tokens are masked to those the constraint allows (grammar library: llguidance), so a finished answer always
    matches it, unless ``max_tokens`` cut it (finish ``length``).

    JSON is compact by default (no free whitespace between tokens, so no model can loop on blanks): the engine
    option ``structured_outputs_any_whitespace`` allows any, as vLLM's ``disable_any_whitespace=False``.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def kind(self) -> str:
        """The constraint's field name; ValueError unless exactly one is set."""
        kinds = [name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(f"exactly one of {', '.join(STRUCTURED_KINDS)} must be set; got "
                             f"{', '.join(kinds) or 'none'}")
        return kinds[0]


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class SamplingParams:
    """OpenAI/vLLM meanings: temperature 0 is greedy (and one in (0, MIN_TEMPERATURE) samples at
    MIN_TEMPERATURE, as vLLM); top_k 0 or -1 disables it; seed makes sampling repeatable.

    Penalties and ``logit_bias`` (token id -> added logit) shape the logits before temperature, top-k/top-p
    and greedy choice, as in vLLM: ``repetition_penalty`` over prompt and output tokens (a positive logit is
    divided by it, a negative one multiplied), ``presence_penalty`` and ``frequency_penalty`` over output tokens
    (minus the penalty once, or once per occurrence). ``logprobs``: report each generated token's log
    probability and the ``logprobs`` most likely alternatives (0: the token's only); ``min_tokens``: neither
    the end-of-sequence token, ``stop_token_ids`` nor ``stop`` strings end the output before it has that many
    tokens (their logits are -inf until then), as in vLLM; ``structured_outputs``: a constraint the output
    follows (StructuredOutputs), applied after the penalties and before temperature, top-k/top-p and greedy
    choice, so every sampling setting keeps its meaning among the allowed tokens; ``prompt_logprobs``: the
    same for every prompt token after the first. Log probabilities are the model's own (log-softmax of its
    logits, before penalties, bias and temperature), as vLLM reports them by default.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    structured_outputs: StructuredOutputs | None = None


MAX_LOGPROBS = 20  # alternatives per token, as vLLM's default max_logprobs and OpenAI's top_logprobs limit
MIN_TEMPERATURE = 0.01  # vLLM's _MAX_TEMP: a positive temperature below it is raised to it (dividing overflows)
MIN_REPETITION_PENALTY = 0.01  # a positive logit is divided by the penalty: much below this it overflows
SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)  # a signed 64-bit integer, as vLLM's and torch.Generator's seeds


@dataclass
class TokenLogprobs:
    """A token's log probability and the ``k`` most likely tokens at its position, most likely first."""

    token_id: int
    logprob: float
    rank: int  # 1 for the most likely token
    top: list[tuple[int, float]]


@dataclass
class GenerationRequest:
    prompt: str | list[int]
    adapter: str | None = None  # None: the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None


@dataclass
class StreamChunk:
    """One step of a request's output. The last chunk has ``finish_reason`` ('stop' or 'length')."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # one per entry of token_ids, when the request asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first chunk only, when asked; None for token 0


@dataclass
class AdapterInfo:
    name: str
    path: str
    method: str
    rank: int
    loaded_at: float


STATS_KEYS = (
    "queued_requests", "running_requests", "adapters_loaded", "adapters_cached", "lora_slots_active", "max_loras",
    "max_cpu_loras", "finished_requests_total", "generated_tokens_total", "steps_total", "prefill_tokens_total",
    "kv_cache_bytes", "lora_slot_bytes", "kv_blocks_used", "kv_blocks_free", "prefix_cache_queries_total",
    "prefix_cache_hits_total", "preemptions_total",
)  # what every engine's stats() holds: /metrics exposes each as ftserve_engine_<key> (a counter if *_total)

# An engine's stats are built as one of these, so a key left out or misspelled is a TypeError, not a gap.
EngineStats = make_dataclass("EngineStats", [(key, float) for key in STATS_KEYS])


class Engine(Protocol):
    """What the server needs from an engine.

    The error contract, the same for every engine (errors.py has the types, each with its HTTP status):

    * raised when ``generate`` is called, before anything is queued: RequestError and its kinds (bad sampling
      parameters, token ids outside the vocabulary, ContextLengthError), UnknownAdapterError (no such adapter,
      or it is being unloaded), QueueFullError, EngineClosedError;
    * raised out of the stream, at the first read or later: EngineClosedError (shut down meanwhile),
      UnknownAdapterError (unloaded before the request was queued), QueueFullError (the queue filled up
      between the call and the first read, when the request is queued), AdapterLoadError (an evicted adapter
      whose folder can no longer be read), GenerationError and SamplingError (this request's step went wrong;
      the requests beside it carry on);
    * raised by ``load_adapter``: AdapterLoadError (and PathOutsideAdapterRootError), AdapterExistsError;
      by ``unload_adapter``: UnknownAdapterError.
    """

    model_name: str  # the base model's served name
    max_model_len: int
    max_queue: int  # requests that may wait beyond the running ones (EngineOptions.max_queue)

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def __aenter__(self) -> "Engine":
        """``start``; ``async with engine:`` runs it and shuts it down at the end."""
        ...

    async def __aexit__(self, *exc: object) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamChunk]:
        """Stream a request's output; closing the iterator early cancels the request."""
        ...

    async def load_adapter(self, name: str, path: str, root: str | os.PathLike | None = None) -> AdapterInfo:
        """Register the adapter at ``path`` as ``name``; with ``root``, every read of it stays inside ``root``."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def tokenizer_for(self, adapter: str | None):
        """The tokenizer (and chat template) to use for a request: an adapter's own wins over the base's."""
        ...

    def prompt_ids(self, prompt: str | list[int], adapter: str | None = None) -> list[int]:
        """The prompt's token ids as ``generate`` runs them (the front end's, frontend.py); RequestError as
        ``generate`` raises it for an empty prompt, ids outside the vocabulary, or text without a tokenizer."""
        ...

    def healthy(self) -> bool:
        """False once the engine can serve nothing more: shut down, or its model loop has died."""
        ...

    def stats(self) -> dict[str, float]:
        """Exactly the keys of STATS_KEYS, each a float: gauges, and counters ending in ``_total``."""
        ...
