"""The scheduler for an asyncio program (the server): one background thread steps, coroutines stream.

    engine = AsyncEngine(scheduler)              # starts the stepping thread (idle while no work)
    stream = engine.submit(ids, params)          # validates now: RequestError / QueueFull / ShuttingDown
    async for event in stream: ...               # TokenEvents of this request as they are produced
    # or, in one go:  async for event in engine.generate(ids, params): ...
    await engine.shutdown(grace_s=30)            # stop admitting, finish in flight, cancel the rest

Threads: `submit` must be called from the event loop that will consume the stream (events are
handed to that loop with `call_soon_threadsafe`); `submit`, `RequestStream.cancel` and `stats`
never wait for a model step. One thread (`rlx-engine`) calls `Scheduler.step()` while there is
work and sleeps on a condition otherwise; a step's events reach each stream's queue as soon as
the step returns (one event per token, the last one with `finish_reason`; "stop" events carry the
EOS / stop token, which a server does not render).

Cancellation: a consumer that stops early cancels its request and frees its pages, whichever way
it stops: `stream.cancel()` / `await stream.aclose()`, leaving an `async with stream:` block,
its task being cancelled while it awaits the next event, `break` out of `engine.generate(...)`
(the generator is closed by the loop's asyncgen hook), or the stream being dropped unfinished
(`__del__`). A cancelled request's pages are back in the pool after the step in progress.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from rlx.errors import RunError
from rlx.runtime.requests import SamplingParams, TokenConstraint, TokenEvent
from rlx.runtime.scheduler import Scheduler, SchedulerStats

log = logging.getLogger(__name__)


class ShuttingDown(RunError):
    """The engine stopped admitting requests (a server answers 503)."""


class RequestStream:
    """One request's events, as an async iterator; ends after the event with `finish_reason`."""

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if event.finished:
            self._done = True
        return event

    def cancel(self) -> None:
        """Stop the request (no further events are delivered); nothing if it finished already."""
        if not self._done:
            self._done = True
            self._engine._cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._done:  # no locks here (a collection may run anywhere): the engine thread cancels it
            self._engine._orphans.append(self.request_id)

    def _deliver(self, event: TokenEvent) -> None:
        if not self._done or event.finished:
            self._queue.put_nowait(event)


class AsyncEngine:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # weak: a stream its consumer dropped is collected, and its __del__ cancels the request
        self._streams: weakref.WeakValueDictionary[str, RequestStream] = weakref.WeakValueDictionary()
        self._cond = threading.Condition()
        self._closing = False   # no new requests
        self._stop = False      # the thread exits once the scheduler has no work
        self._orphans: list[str] = []  # requests of streams dropped unfinished
        self._thread = threading.Thread(target=self._drive, name="rlx-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, constraint: TokenConstraint | None = None,
               request_id: str | None = None) -> RequestStream:
        """Queue a request from a coroutine; its stream. Raises at once when it is refused."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the engine is shutting down and admits no new requests",
                                   hint="retry against another instance, or after the restart")
            request_id = self.scheduler.submit(prompt_ids, params, constraint=constraint, request_id=request_id)
            stream = RequestStream(self, request_id, loop)
            self._streams[request_id] = stream
            self._cond.notify()
        return stream

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                       constraint: TokenConstraint | None = None,
                       request_id: str | None = None) -> AsyncIterator[TokenEvent]:
        """`submit`, then yield its events; stopping early (break, aclose, task cancelled) cancels it."""
        stream = self.submit(prompt_ids, params, constraint=constraint, request_id=request_id)
        try:
            async for event in stream:
                yield event
        finally:
            stream.cancel()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    @property
    def closing(self) -> bool:
        return self._closing

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop admitting; let the requests in flight finish for up to `grace_s` seconds; cancel
        what is left (their streams end with "cancelled"); stop the thread."""
        with self._cond:
            self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.scheduler.has_work() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.scheduler.cancel_all()
        with self._cond:
            self._stop = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)  # let the last events reach their queues

    def _cancel(self, request_id: str) -> None:
        with self._cond:
            self._streams.pop(request_id, None)
            if self.scheduler.cancel(request_id):
                self._cond.notify()

    def _drive(self) -> None:
        while True:
            with self._cond:
                while not self.scheduler.has_work():
                    if self._stop:
                        return
                    self._cond.wait()
            while self._orphans:
                self._cancel(self._orphans.pop())
            try:
                events = self.scheduler.step()
            except Exception:  # a scheduler bug: fail what is in flight rather than hang its consumers
                log.exception("the engine step failed; cancelling every request")
                self.scheduler.cancel_all()
                events = [TokenEvent(rid, 0, None, finish_reason="error", error="the engine failed; see its log")
                          for rid in list(self._streams)]
            self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        with self._cond:
            targets = [(self._streams.pop(e.request_id, None) if e.finished else self._streams.get(e.request_id), e)
                       for e in events]
        for stream, event in targets:
            if stream is None:
                continue
            try:
                stream._loop.call_soon_threadsafe(stream._deliver, event)
            except RuntimeError:  # its event loop is closed: nobody is listening
                self._cancel(event.request_id)
