"""The threads that render chat templates and tokenize for requests, apart from asyncio's default executor.

The default executor also loads adapters and joins the engine's thread at shutdown, so work that a request
controls must never fill it. A chat template's render is bounded in time (templates.py), so a render worker is
normally free again within the chat-template timeout; but a thread cannot be killed, so:

- jobs run on daemon threads (kept and reused: starting a thread per job cost more than most renders), so
  one caught in a long C call never keeps the process from exiting;
- at most ``workers`` jobs run at once, and at most ``workers - 1`` of one lane (a model: its chat template),
  so a template that always runs out its time never holds every worker: other models keep being rendered;
- a job that finds no free worker within ``timeout`` seconds is answered 429 with Retry-After (the server's
  answer to more requests than it serves at once), so a burst of slow templates delays others by at most that;
- ``saturated`` says why /health should answer 503: every worker has been on its job for longer than
  ``timeout``, which no bounded render does, so they are stuck and nothing rendered will be answered.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from typing import Any, Callable

from .errors import APIError


class _Lane:
    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.jobs = 0  # waiting or running: the lane is dropped when none are left


class RenderWorkers:
    def __init__(self, workers: int, timeout: float) -> None:
        self.workers, self.timeout = workers, timeout
        self.slots = asyncio.Semaphore(workers)
        self.lanes: dict[str, _Lane] = {}
        self.started: dict[int, float] = {}  # running job -> when it started (monotonic)
        self.ids = itertools.count()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0  # started so far; never more than ``workers``, so one is free for every held slot

    def _serve_jobs(self) -> None:
        while True:
            self.jobs.get()()

    async def _acquire(self, slots: asyncio.Semaphore, what: str) -> None:
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout)
        except TimeoutError:
            raise APIError(429, f"{what} stayed busy for {self.timeout:g} s (--chat-template-timeout); retry "
                                f"shortly.", code="render_workers_busy",
                           retry_after=max(1, round(self.timeout))) from None

    async def run(self, func: Callable[..., Any], *args: Any, lane: str) -> Any:
        """``func(*args)`` on a worker thread; its result, or its exception raised here. ``lane``: the model
        whose chat template the job may render."""
        share = self.lanes.setdefault(lane, _Lane(max(1, self.workers - 1)))
        share.jobs += 1
        held: list[asyncio.Semaphore] = []

        def release() -> None:
            for slots in held:
                slots.release()
            share.jobs -= 1
            if share.jobs == 0 and self.lanes.get(lane) is share:
                del self.lanes[lane]

        try:
            await self._acquire(share.slots, f"The prompt rendering workers that `{lane}` may use")
            held.append(share.slots)
            await self._acquire(self.slots, f"All {self.workers} prompt rendering workers")
            held.append(self.slots)
        except BaseException:
            release()
            raise
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = next(self.ids)
        self.started[job] = time.monotonic()

        def finish(outcome: tuple[bool, Any]) -> None:
            del self.started[job]
            release()
            if future.done():  # its request was cancelled: nobody waits for the result
                return
            ok, value = outcome
            future.set_result(value) if ok else future.set_exception(value)

        def work() -> None:
            try:
                outcome = (True, func(*args))
            except BaseException as exc:  # handed to the request's task, which raises it
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(finish, outcome)
            except RuntimeError:  # the loop has closed: the server is gone
                pass

        if self.threads < self.workers:
            self.threads += 1
            threading.Thread(target=self._serve_jobs, name=f"ftserve-render-{self.threads}", daemon=True).start()
        self.jobs.put(work)
        return await future

    def saturated(self) -> str | None:
        """Why no rendered request can be answered now, or None."""
        now = time.monotonic()
        if len(self.started) < self.workers or any(now - t <= self.timeout for t in self.started.values()):
            return None
        return (f"all {self.workers} prompt rendering workers have been busy for more than {self.timeout:g} s "
                f"(--chat-template-timeout)")
