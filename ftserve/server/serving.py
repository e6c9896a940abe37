"""Completions and chat completions: from an OpenAI request to engine requests and back, streaming or not.

The ``model`` field names the base model (its served name) or a loaded adapter, as in vLLM. Chat prompts are
rendered with the chat template of the tokenizer the engine picks for that model (an adapter's own wins) and
tokenized without adding special tokens, since the template places them. Completions with ``echo`` ask the
engine's front end for a prompt's ids and pass those on, so the echoed tokens are the ones the engine scores.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Gauge

from ..engine.base import Engine, GenerationRequest
from ..engine.errors import RequestError
from .cost import check_choices, check_context, check_logprobs
from .errors import APIError, from_exception, model_not_found
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, new_id, now, usage
from .resolution import AdapterResolver
from .settings import ServerSettings
from .tools import ToolCalling
from .streams import (
    GONE,
    Choice,
    Disconnected,
    Tracker,
    client_gone,
    count_tokens,
    first_event,
    merged,
    open_streams,
    run_to_end,
    sse_stream,
    unless_disconnected,
)
from .templates import TemplateLimitError, render
from .workers import RenderWorkers


INLINE_RESPONSE_TOKENS = 4096  # a response of fewer generated tokens, without log probabilities, is built inline


async def respond(build: Callable[[], JSONResponse], choices: list, heavy: bool) -> JSONResponse:
    """The finished response, built in a worker thread where it is large: with log probabilities (or an echoed
    prompt) every token of every choice is decoded and encoded, seconds on the event loop for a big fan-out. A
    small one is built inline: the hop to a thread waits for the GIL behind the engine's thread, milliseconds
    per request, more than the building itself."""
    if heavy or sum(len(c.token_ids) for c in choices) > INLINE_RESPONSE_TOKENS:
        return await asyncio.to_thread(build)
    return build()


@contextlib.contextmanager
def constraint_errors(body: CompletionRequest | ChatCompletionRequest, param: str | None = None):
    """An engine's refusal of the request's output constraint (a schema, regex or grammar it cannot compile, or
    one over its bounds: the engine names it ``structured_outputs.<kind>``) answered with ``param`` naming the
    field the client sent it in (``response_format.json_schema.schema``, ``structured_outputs.regex``, ...);
    ``param``: that field for a constraint the body's output fields do not give (a tool choice's)."""
    try:
        yield
    except RequestError as exc:
        param = body.constraint_param() if body.constraint is not None else param
        if param is not None and "structured_outputs" in str(exc):
            raise from_exception(exc, param=param) from exc
        raise


class OpenAIServing:
    """The two generation routes, the model-name lookup, and admission (429 over the limit, 503 draining)."""

    def __init__(self, engine: Engine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.draining = False
        self.renders = RenderWorkers(settings.render_workers, settings.chat_template_timeout)
        Gauge("ftserve_prompt_renders_running", "Chat templates being rendered, and prompts tokenized, on the "
              "render workers now.", registry=metrics.registry).set_function(lambda: len(self.renders.started))
        self.resolver = AdapterResolver(engine, settings.adapter_root, metrics) \
            if settings.enable_adapter_resolution and settings.adapter_root is not None else None

    # Model names and admission ---------------------------------------------------------------------

    def resolve(self, model: str) -> str | None:
        """The adapter a ``model`` field names, None for the base model; 404 for anything else."""
        if model == self.settings.served_model_name or model in self.settings.base_aliases:
            return None
        adapters = [info.name for info in self.engine.list_adapters()]
        if model in adapters:
            return model
        raise model_not_found(model, [self.settings.served_model_name, *adapters])

    async def resolve_or_load(self, model: str) -> str | None:
        """``resolve``, and with adapter resolution on, an adapter not loaded yet is loaded from the root first."""
        try:
            return self.resolve(model)
        except APIError:
            if self.resolver is None:
                raise
        self.admit()  # nothing is loaded for a request that would be refused
        await self.resolver.load(model)
        return self.resolve(model)

    def admit(self) -> None:
        if self.draining:
            raise APIError(503, "The server is shutting down and accepts no new requests.", code="shutting_down",
                           retry_after=5)
        if self.metrics.in_flight >= self.settings.max_concurrent_requests:
            raise APIError(429, f"The server is at its limit of {self.settings.max_concurrent_requests} concurrent "
                                f"requests (--max-concurrent-requests); retry shortly.", code="overloaded",
                           retry_after=1)

    # Completions --------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, disconnected: Disconnected | None = None):
        body.check()
        prompts = body.prompts()
        check_choices(self.engine, len(prompts), body.n)
        adapter = await self.resolve_or_load(body.model)
        self.admit()
        tokenizer = self.engine.tokenizer_for(adapter)
        if tokenizer is None and (body.echo or body.logprobs is not None):
            name = "echo" if body.echo else "logprobs"
            raise APIError(400, f"`{name}` needs a tokenizer to turn tokens into text, and `{body.model}` is served "
                                f"without one.", param=name, code="unsupported_parameter")
        echo_only = body.token_limit == 0  # the engine generates one token, which is dropped, as in vLLM

        def prepare() -> tuple[list[list[int]], list[tuple[list[int], str]]]:
            """Each prompt's ids, made once by the engine's front end (checked against the vocabulary): what it
            runs and what is echoed; checked against the context and the log probabilities a response holds."""
            engine_prompts = [self.engine.prompt_ids(p, adapter) for p in prompts]
            check_context([len(ids) for ids in engine_prompts], max(body.token_limit, 1), self.engine.max_model_len,
                          "prompt")
            if body.logprobs is not None:
                generated = 0 if echo_only else body.token_limit
                positions = body.n * sum((len(ids) if body.echo else 0) + generated for ids in engine_prompts)
                check_logprobs(positions, body.logprobs, self.settings.max_response_logprobs, "logprobs",
                               "`n`, `logprobs` or `max_tokens`, or send the prompts in several requests")
            echoes = [(ids, prompt if isinstance(prompt, str) else tokenizer.decode(ids))
                      for prompt, ids in zip(prompts, engine_prompts)] if body.echo else []
            return engine_prompts, echoes

        # In a worker thread: a 4 MiB prompt takes seconds to tokenize, and on the event loop every other stream,
        # /health and /metrics would wait for it (tokenizers releases the GIL while it encodes).
        engine_prompts, echoes = await asyncio.to_thread(prepare)
        response_id, created = new_id("cmpl"), now()
        requests = [GenerationRequest(prompt, adapter, body.sampling_params(max(body.token_limit, 1), i),
                                      f"{response_id}-{p}-{i}")
                    for p, prompt in enumerate(engine_prompts) for i in range(body.n)]
        streams = open_streams(self.engine, requests)
        tracker = Tracker(self.metrics, "/v1/completions", body.model)

        def content(index: int, state: Choice, text: str, token_ids: list[int], entries, prompt_entries):
            """Text and logprobs of a choice's tokens (a chunk's, or all): the echoed prompt's before the
            first ones."""
            if echo_only:
                text, token_ids, entries = "", [], []
            if body.echo and not state.started:
                prompt_ids, prompt_text = echoes[index // body.n]
                text, token_ids = prompt_text + text, prompt_ids + token_ids
                entries = [*(prompt_entries or []), *(entries or [])]
            state.started = True
            if body.logprobs is None:
                return text, None
            logprobs = completion_logprobs(tokenizer, token_ids, entries, state.text_offset)
            state.text_offset += sum(len(token) for token in logprobs["tokens"])
            return text, logprobs

        def choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

        def envelope(choices: list[dict], **extra) -> dict:
            return {"id": response_id, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, **extra}

        def counted(prompt_tokens: int, completion_tokens: int) -> dict:
            return usage(prompt_tokens, 0 if echo_only else completion_tokens)

        if body.stream:
            def frame(index, chunk, state):
                text, logprobs = content(index, state, chunk.text, chunk.token_ids, chunk.logprobs,
                                         chunk.prompt_logprobs)
                if text or chunk.finish_reason or (logprobs and logprobs["tokens"]):
                    yield envelope([choice(index, text, logprobs, chunk.finish_reason)])

            usage_frame = (lambda p, c: envelope([], usage=counted(p, c))) if body.include_usage else None
            return await self._stream(streams, tracker, len(prompts), frame, usage_frame, disconnected)
        choices = await self._run(streams, tracker, len(prompts), disconnected)
        if choices is None:
            return client_gone()
        return await respond(lambda: JSONResponse(envelope(
            [choice(i, *content(i, c, "".join(c.text), c.token_ids, c.logprobs, c.prompt_logprobs), c.finish_reason)
             for i, c in enumerate(choices)],
            usage=counted(*count_tokens(choices, len(prompts))))), choices, body.logprobs is not None or body.echo)

    # Chat ----------------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, disconnected: Disconnected | None = None):
        body.check()
        calling = body.tool_calling(self.settings.enable_auto_tool_choice, self.settings.tool_call_parser)
        with constraint_errors(body, calling.param):
            return await self._chat(body, calling, disconnected)

    async def _chat(self, body: ChatCompletionRequest, calling: ToolCalling, disconnected: Disconnected | None):
        check_choices(self.engine, 1, body.n)
        adapter = await self.resolve_or_load(body.model)
        self.admit()
        tokenizer = self.engine.tokenizer_for(adapter)
        prompt = await self.renders.run(self.render_chat, body, tokenizer, lane=body.model)  # off the loop, bounded
        limit = body.token_limit
        if limit is None:
            limit = self.engine.max_model_len - len(prompt)
            if limit < 1:
                raise APIError(400, f"The messages take {len(prompt)} tokens, the whole context of this model "
                                    f"({self.engine.max_model_len}); shorten them.", param="messages",
                               code="context_length_exceeded")
        check_context([len(prompt)], limit, self.engine.max_model_len, "messages")
        if body.logprobs:
            check_logprobs(body.n * limit, body.top_logprobs or 0, self.settings.max_response_logprobs,
                           "top_logprobs", "`n`, `top_logprobs` or `max_tokens` (without it, each answer may "
                                           "fill the rest of the context)")
        rid = new_id("chatcmpl")
        requests = [GenerationRequest(prompt, adapter, calling.constrain(body.sampling_params(limit, i)), f"{rid}-{i}")
                    for i in range(body.n)]
        streams = open_streams(self.engine, requests)
        created = now()
        tracker = Tracker(self.metrics, "/v1/chat/completions", body.model)

        def logprobs(token_ids: list[int], entries) -> dict | None:
            return chat_logprobs(tokenizer, token_ids, entries) if body.logprobs else None

        def envelope(choices: list[dict], obj: str = "chat.completion.chunk", **extra) -> dict:
            return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": choices,
                    **extra}

        if body.stream:
            readers = [calling.stream() for _ in range(body.n)]  # text to content and tool call deltas, per choice

            def frame(index, chunk, state):
                if not state.started:
                    state.started = True
                    yield envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}])
                chunk_logprobs = logprobs(chunk.token_ids, chunk.logprobs)
                delta, finish_reason = readers[index].step(chunk.text, chunk.finish_reason)
                if delta or finish_reason or (chunk_logprobs and chunk_logprobs["content"]):
                    yield envelope([{"index": index, "delta": delta, "logprobs": chunk_logprobs,
                                     "finish_reason": finish_reason}])

            usage_frame = (lambda p, c: envelope([], usage=usage(p, c))) if body.include_usage else None
            return await self._stream(streams, tracker, 1, frame, usage_frame, disconnected)
        choices = await self._run(streams, tracker, 1, disconnected)
        if choices is None:
            return client_gone()

        def answer(index: int, choice: Choice) -> dict:
            message, finish_reason = calling.message("".join(choice.text), choice.finish_reason)
            return {"index": index, "message": message, "logprobs": logprobs(choice.token_ids, choice.logprobs),
                    "finish_reason": finish_reason}

        return await respond(lambda: JSONResponse(envelope(
            [answer(i, c) for i, c in enumerate(choices)], obj="chat.completion",
            usage=usage(*count_tokens(choices, 1)))), choices, bool(body.logprobs))

    # Tokens ---------------------------------------------------------------------------------------

    def tokenize(self, body: TokenizeRequest) -> dict:
        body.check()
        body.model = body.model or self.settings.served_model_name
        tokenizer = self._tokenizer(body.model)
        if body.messages is not None:
            ids = self.render_chat(body, tokenizer, add_special_tokens=bool(body.add_special_tokens))
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = list(tokenizer(body.prompt, add_special_tokens=add)["input_ids"])
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        model = body.model or self.settings.served_model_name
        tokenizer = self._tokenizer(model)
        size = len(tokenizer)
        outside = [t for t in body.tokens if not 0 <= t < size]
        if outside:
            raise APIError(400, f"Token ids {outside[:5]} are outside the vocabulary of `{model}` (0 .. {size - 1}).",
                           param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(body.tokens)}

    def _tokenizer(self, model: str):
        tokenizer = self.engine.tokenizer_for(self.resolve(model))
        if tokenizer is None:
            raise APIError(400, f"`{model}` is served without a tokenizer.", param="model", code="no_tokenizer")
        return tokenizer

    def render_chat(self, body: ChatCompletionRequest | TokenizeRequest, tokenizer,
                    add_special_tokens: bool = False) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"`{body.model}` has no chat template in its tokenizer, so it cannot serve chat; "
                                f"use /v1/completions, or add a chat template to the tokenizer files.",
                           param="model", code="no_chat_template")
        try:
            text = render(tokenizer, body.conversation(), body.add_generation_prompt,
                          self.settings.chat_template_timeout, self.settings.max_template_chars, body.template_tools())
        except (TemplateLimitError, RecursionError, MemoryError) as exc:
            raise APIError(400, f"The chat template of `{body.model}` was stopped: {exc}. The template belongs to the "
                                f"model or adapter, not to this request: fix it in its tokenizer_config.json.",
                           param="model", code="chat_template_limit") from None
        except Exception as exc:  # jinja raises for conversations a template does not accept
            raise APIError(400, f"The chat template of `{body.model}` cannot render these messages: {exc}",
                           param="messages", code="invalid_messages") from None
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # Running ------------------------------------------------------------------------------------

    async def _run(self, streams, tracker: Tracker, prompts: int,
                   disconnected: Disconnected | None) -> list[Choice] | None:
        """Every choice to its end; None if the client went away first (its requests are then cancelled)."""
        choices = None
        try:
            result = await unless_disconnected(run_to_end(streams, tracker), disconnected)
            choices = None if result is GONE else result
            return choices
        finally:
            tracker.close(choices, prompts)

    async def _stream(self, streams, tracker: Tracker, prompts: int, frame, usage_frame,
                      disconnected: Disconnected | None):
        events = merged(streams)
        try:
            first = await unless_disconnected(first_event(events), disconnected)
        except BaseException:
            await events.aclose()
            tracker.close()
            raise
        if first is GONE:
            await events.aclose()
            tracker.close()
            return client_gone()
        body = sse_stream(events, first, len(streams), prompts, frame, tracker, usage_frame)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
