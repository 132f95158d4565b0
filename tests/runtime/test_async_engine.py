"""AsyncEngine: concurrent asyncio consumers over one stepping thread; every way of stopping early
cancels the request and frees its pages; shutdown finishes or cancels what is in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from rlx.runtime.async_engine import AsyncEngine, ShuttingDown
from rlx.runtime.paged_model import StepBatch
from rlx.runtime.requests import RequestError, SamplingParams
from rlx.runtime.scheduler import Scheduler
from tests.runtime.test_scheduler import alone, assert_all_pages_back, mixed_requests
from tests.runtime.toy_paged import ToyPagedModel


class _SlowToy(ToyPagedModel):
    """A step takes a few milliseconds, like a real one: consumers can stop mid-generation."""

    def forward(self, batch: StepBatch) -> np.ndarray:
        time.sleep(0.01)
        return super().forward(batch)


def _engine(**kwargs: int) -> AsyncEngine:
    return AsyncEngine(Scheduler(_SlowToy(max_seq=200, num_pages=80), eos_ids=(1,), **kwargs))


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_concurrent_consumers_get_their_own_tokens() -> None:
    requests = mixed_requests(12, seed=4)

    async def main() -> list[list[int]]:
        engine = _engine(max_batch=6)

        async def consume(prompt: list[int], params: SamplingParams) -> list[int]:
            return [e.token async for e in engine.generate(prompt, params) if e.token is not None]

        out = await asyncio.gather(*(consume(p, s) for p, s in requests))
        await engine.shutdown(grace_s=1)
        assert_all_pages_back(engine.scheduler)
        return out

    assert asyncio.run(main()) == [alone(p, s) for p, s in requests]


@pytest.mark.parametrize("how", ["break", "task-cancel", "stream-cancel", "async-with", "dropped"])
def test_stopping_early_cancels_and_frees_pages(how: str) -> None:
    async def main() -> None:
        engine = _engine()
        other = asyncio.create_task(_tokens(engine.generate([3, 4], SamplingParams(max_new_tokens=30))))
        params = SamplingParams(max_new_tokens=150, ignore_eos=True)
        got: list[int] = []
        if how == "break":
            async for event in engine.generate([5, 6, 7], params):
                got.append(event.token)
                if len(got) == 3:
                    break
        elif how == "task-cancel":
            task = asyncio.create_task(_tokens(engine.generate([5, 6, 7], params)))
            await _until(lambda: engine.stats().generation_tokens >= 3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "stream-cancel":
            stream = engine.submit([5, 6, 7], params)
            await anext(stream)
            stream.cancel()
            assert [e async for e in stream] == []
        elif how == "async-with":
            async with engine.submit([5, 6, 7], params) as stream:
                await anext(stream)
        else:
            stream = engine.submit([5, 6, 7], params)
            await anext(stream)
            del stream
        assert len(await other) == len(alone([3, 4], SamplingParams(max_new_tokens=30)))
        await _until(lambda: engine.stats().running == 0)
        assert engine.stats().generation_tokens < 30 + 100  # the stopped one ended long before its 150 tokens
        assert_all_pages_back(engine.scheduler)
        await engine.shutdown(grace_s=0)

    asyncio.run(main())


async def _tokens(events) -> list[int]:  # noqa: ANN001
    return [e.token async for e in events if e.token is not None]


def test_refusals_raise_at_submit() -> None:
    async def main() -> None:
        engine = _engine(max_queue=0)
        with pytest.raises(RequestError) as e:
            engine.submit([3], SamplingParams(top_p=7))
        assert e.value.param == "top_p"
        await engine.shutdown(grace_s=0)
        with pytest.raises(ShuttingDown):
            engine.submit([3], SamplingParams())

    asyncio.run(main())


def test_shutdown_finishes_in_flight_within_grace_then_cancels() -> None:
    async def main() -> None:
        engine = _engine()
        short = [engine.submit([3, i + 2], SamplingParams(max_new_tokens=5, ignore_eos=True)) for i in range(4)]
        await engine.shutdown(grace_s=10)
        assert [len([e async for e in s]) for s in short] == [5] * 4
        engine = _engine()
        long = engine.submit([3, 4], SamplingParams(max_new_tokens=190, ignore_eos=True))
        await anext(long)
        await engine.shutdown(grace_s=0.05)
        events = [e async for e in long]
        assert events[-1].finish_reason == "cancelled" and len(events) < 150
        assert not engine._thread.is_alive()
        assert_all_pages_back(engine.scheduler)

    asyncio.run(main())
