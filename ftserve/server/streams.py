"""Running a request's choices on the engine: merged streams, per-request metrics, SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from fastapi.responses import JSONResponse

from ..engine.base import Engine, GenerationRequest, StreamChunk, TokenLogprobs
from .errors import error_body, from_exception
from .metrics import ServerMetrics


async def _close(iterator) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def open_streams(engine: Engine, requests: list[GenerationRequest]) -> list[AsyncIterator[StreamChunk]]:
    """Every request's stream, or the first request's error with nothing queued: the engine checks a request
    when ``generate`` is called and queues it only when its stream is first read, so a fan-out (``n > 1``, a
    list of prompts) is validated whole before any of it runs."""
    return [engine.generate(request) for request in requests]  # an error drops the unstarted ones unread


async def merged(streams: list[AsyncIterator[StreamChunk]]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """``(choice index, chunk)`` from every stream as the engine produces them. Closing this iterator (a client
    that went away) closes every engine stream, which cancels their requests. Any stream's failure is raised
    here, and the others are cancelled."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await _close(streams[0])
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk, None))
            queue.put_nowait((index, None, None))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, None, exc))
        finally:
            await _close(stream)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
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


Disconnected = Callable[[], Awaitable[None]]  # returns when the client has gone away
GONE = object()  # what ``unless_disconnected`` returns when the client went away first
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection; only metrics see it


async def unless_disconnected(work: Awaitable, disconnected: Disconnected | None):
    """``work``'s result, or GONE once the client has disconnected, after cancelling ``work`` (which closes
    its engine streams, cancelling their requests: a client that gives up costs nothing more)."""
    if disconnected is None:
        return await work
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watch, task, return_exceptions=True)
    return GONE if task.cancelled() else task.result()


def client_gone() -> JSONResponse:
    """The answer to a request whose client left: nobody reads it, but the metrics count it."""
    return JSONResponse(error_body(CLIENT_CLOSED, "The client closed the connection before the answer was ready."),
                        status_code=CLIENT_CLOSED)


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
        metrics.generation_requests.labels(model=model).inc()

    def token(self) -> None:
        if not self.first:
            self.first = True
            self.metrics.waiting -= 1
            self.metrics.ttft.labels(route=self.route).observe(time.perf_counter() - self.start)

    def close(self, choices: list[Choice] | None = None, prompts: int = 1) -> None:
        if self.closed:
            return
        self.closed = True
        self.metrics.in_flight -= 1
        if not self.first:
            self.metrics.waiting -= 1
        if choices:
            prompt_tokens, completion_tokens = count_tokens(choices, prompts)
            self.metrics.prompt_tokens.labels(model=self.model).inc(prompt_tokens)
            self.metrics.generation_tokens.labels(model=self.model).inc(completion_tokens)
            self.metrics.latency.labels(route=self.route).observe(time.perf_counter() - self.start)


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


async def run_to_end(streams: list[AsyncIterator[StreamChunk]], tracker: Tracker) -> list[Choice]:
    choices = [Choice() for _ in streams]
    events = merged(streams)
    try:
        async for index, chunk in events:
            tracker.token()
            record(choices[index], chunk)
    finally:
        await events.aclose()
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
