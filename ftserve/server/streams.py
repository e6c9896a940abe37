"""Running a request's choices on the engine: merged streams, per-request metrics, SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..engine.base import Engine, GenerationRequest, StreamChunk, TokenLogprobs
from .errors import from_exception
from .metrics import ServerMetrics


async def _close(iterator) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def merged(engine: Engine, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """``(choice index, chunk)`` from every request as the engine produces them. Closing this iterator (a client
    that went away) closes every engine stream, which cancels their requests."""
    if len(requests) == 1:
        stream = engine.generate(requests[0])
        try:
            async for chunk in stream:
                yield 0, chunk
        finally:
            await _close(stream)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, request: GenerationRequest) -> None:
        stream = engine.generate(request)
        try:
            async for chunk in stream:
                await queue.put((index, chunk, None))
            await queue.put((index, None, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, None, exc))
        finally:
            await _close(stream)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        running = len(tasks)
        while running:
            index, chunk, exc = await queue.get()
            if exc is not None:
                raise exc
            if chunk is None:
                running -= 1
            else:
                yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: bool = False  # its first frame is out: a chat stream's role, a completion's echoed prompt
    text_offset: int = 0  # where its next token's text starts, in completions logprobs


class Tracker:
    """One completion or chat request in the metrics: in flight from creation to ``close``."""

    def __init__(self, metrics: ServerMetrics, route: str, model: str) -> None:
        self.metrics, self.route, self.model = metrics, route, model
        self.start = time.perf_counter()
        self.first = False
        self.closed = False
        metrics.in_flight += 1
        metrics.waiting += 1
        metrics.generation_requests.inc(model=model)

    def token(self) -> None:
        if not self.first:
            self.first = True
            self.metrics.waiting -= 1
            self.metrics.ttft.observe(time.perf_counter() - self.start, route=self.route)

    def close(self, choices: list[Choice] | None = None, prompts: int = 1) -> None:
        if self.closed:
            return
        self.closed = True
        self.metrics.in_flight -= 1
        if not self.first:
            self.metrics.waiting -= 1
        if choices:
            prompt_tokens, completion_tokens = count_tokens(choices, prompts)
            self.metrics.prompt_tokens.inc(prompt_tokens, model=self.model)
            self.metrics.generation_tokens.inc(completion_tokens, model=self.model)
            self.metrics.latency.observe(time.perf_counter() - self.start, route=self.route)


def count_tokens(choices: list[Choice], prompts: int) -> tuple[int, int]:
    """Prompt tokens count once per prompt however many choices (n) each has, as OpenAI counts them."""
    n = len(choices) // max(prompts, 1)
    prompt_tokens = sum(choices[p * n].prompt_tokens for p in range(prompts))
    return prompt_tokens, sum(c.completion_tokens for c in choices)


def record(choice: Choice, chunk: StreamChunk) -> None:
    if chunk.text:
        choice.text.append(chunk.text)
    choice.token_ids += chunk.token_ids
    choice.logprobs += chunk.logprobs or []
    if chunk.prompt_logprobs is not None:
        choice.prompt_logprobs = chunk.prompt_logprobs
    choice.prompt_tokens = chunk.prompt_tokens or choice.prompt_tokens
    choice.completion_tokens = chunk.completion_tokens or choice.completion_tokens
    if chunk.finish_reason:
        choice.finish_reason = chunk.finish_reason


async def run_to_end(engine: Engine, requests: list[GenerationRequest], tracker: Tracker) -> list[Choice]:
    choices = [Choice() for _ in requests]
    async for index, chunk in merged(engine, requests):
        tracker.token()
        record(choices[index], chunk)
    return choices


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def first_event(events: AsyncIterator):
    """A stream's first event (None if it has none). Awaited before answering 200, so that a request the engine
    refuses gets its error status instead of a broken stream."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def sse_stream(events: AsyncIterator[tuple[int, StreamChunk]], first, n_choices: int, prompts: int,
                     frame, tracker: Tracker, usage_frame=None) -> AsyncIterator[bytes]:
    """The body of a streaming response: ``frame(index, chunk, choice)`` gives each event's payloads; a failure
    mid-stream becomes an error event; the stream always ends with ``data: [DONE]``."""
    choices = [Choice() for _ in range(n_choices)]
    try:
        pending = [first] if first is not None else []
        while True:
            if pending:
                index, chunk = pending.pop()
            else:
                try:
                    index, chunk = await events.__anext__()
                except StopAsyncIteration:
                    break
            tracker.token()
            record(choices[index], chunk)
            for payload in frame(index, chunk, choices[index]):
                yield sse(payload)
        if usage_frame is not None:
            yield sse(usage_frame(*count_tokens(choices, prompts)))
    except Exception as exc:  # the status line is sent: report in-band, as vLLM does
        yield sse(from_exception(exc).body())
    finally:
        await _close(events)
        tracker.close(choices, prompts)
    yield sse("[DONE]")
