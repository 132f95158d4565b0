"""The scheduler over the reference `PagedModel` of tiny Gemma checkpoints, against the
single-sequence engine (`generate`, as `rlx run` runs it): many requests at once give each
request's own tokens; a reused prefix gives the logits of a computation from scratch, on
sliding-window models too (window 4, pages of 4, prefixes of 8+ tokens); preemption and
cancellation leave nothing held.

Tolerance for logits: the paged step and the single-sequence graphs run in the same interpreter
over the same weights; attention sums over another number of keys per row, so rtol 1e-5 with a
floor of 1e-5 x max|logit| (as tests/runtime/test_paged_model.py); tokens must be equal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.compiler.engines import paged_reference_engine, reference_engine
from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.runtime.batch import generate_batch, pages_for_batch
from rlx.runtime.generate import generate
from rlx.runtime.reference import ReferenceEngine
from rlx.runtime.requests import SamplingParams, TokenEvent
from rlx.runtime.sampler import Sampler
from rlx.runtime.scheduler import Scheduler
from tests.runtime.test_scheduler import assert_all_pages_back, collect, tokens_of

Ckpt = Callable[[str], Path]
PAGE = 4
EOS = (1,)


@pytest.fixture(scope="module")
def single(tiny_ckpt: Ckpt) -> Callable[[str], ReferenceEngine]:
    made: dict[str, ReferenceEngine] = {}

    def get(family: str) -> ReferenceEngine:
        if family not in made:
            made[family] = reference_engine(open_checkpoint(tiny_ckpt(family)), passes=DEFAULT_PIPELINE)
        return made[family]

    return get


def scheduler(tiny_ckpt: Ckpt, single: ReferenceEngine, family: str, num_pages: int, **kwargs: object) -> Scheduler:
    paged = paged_reference_engine(open_checkpoint(tiny_ckpt(family)), num_pages=num_pages, page_size=PAGE,
                                   passes=DEFAULT_PIPELINE, shared=single, max_seq=64)
    return Scheduler(paged, eos_ids=EOS, **kwargs)  # type: ignore[arg-type]


def run_alone(engine: ReferenceEngine, prompt: list[int], settings: dict) -> list[int]:
    """`rlx run`'s path: the single-sequence engine, `Sampler`, `generate`."""
    sampler = Sampler(**{k: v for k, v in settings.items() if k not in ("max_new_tokens", "ignore_eos")})
    return generate(engine, prompt, settings["max_new_tokens"], sampler=sampler,
                    eos_ids=() if settings.get("ignore_eos") else EOS, keep_logits=False).tokens


def requests(n: int, *, fixed: dict | None = None) -> list[tuple[list[int], dict]]:
    """`n` prompts and sampling settings, lengths random unless `fixed` (prompt_len, max_new_tokens)."""
    rng = np.random.default_rng(1)
    kinds = [dict(), dict(temperature=0.9, seed=3), dict(temperature=1.1, top_k=8, seed=4),
             dict(temperature=0.8, top_p=0.85, seed=5)]
    out = []
    for i in range(n):
        length = fixed["prompt_len"] if fixed else int(rng.integers(1, 14))
        settings = dict(max_new_tokens=fixed["max_new_tokens"], ignore_eos=True) if fixed else \
            dict(max_new_tokens=int(rng.integers(1, 9)))
        out.append((rng.integers(2, 256, size=length).tolist(), {**settings, **kinds[i % len(kinds)]}))
    return out


def test_sixteen_concurrent_requests_equal_rlx_run(tiny_ckpt: Ckpt, single: Callable[[str], ReferenceEngine]) -> None:
    engine = single("gemma3")
    s = scheduler(tiny_ckpt, engine, "gemma3", num_pages=96, max_batch=16, max_tokens_per_step=48)
    batch = requests(16)
    ids = [s.submit(prompt, SamplingParams(**settings)) for prompt, settings in batch]
    by_id = collect(list(s.run()))
    for rid, (prompt, settings) in zip(ids, batch, strict=True):
        assert tokens_of(by_id[rid]) == run_alone(engine, prompt, settings), (rid, settings)
    assert s.stats().steps * 3 < sum(len(tokens_of(es)) for es in by_id.values())  # one by one: a step per token
    assert_all_pages_back(s)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_reused_prefix_gives_the_logits_of_a_fresh_prefill(family: str, tiny_ckpt: Ckpt,
                                                           single: Callable[[str], ReferenceEngine]) -> None:
    """Sliding-window families (window 4): 12 reused positions, far past the window."""
    engine = single(family)
    rows: dict[str, list[np.ndarray]] = {}
    s = scheduler(tiny_ckpt, engine, family, num_pages=32, on_logits=lambda rid, row: rows.setdefault(rid, []).append(row))
    system = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11, 30, 31, 32]
    s.submit([*system, 40], SamplingParams(max_new_tokens=2, ignore_eos=True))
    list(s.run())
    prompt = [*system, 50, 51]
    rid = s.submit(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    generated = tokens_of(collect(list(s.run()))[rid])
    assert s.stats().prefix_hits == 12  # the 3 full pages of the shared 13 tokens
    fresh = generate(engine, prompt, 4)
    assert generated == fresh.tokens
    ref = fresh.logits_array()
    np.testing.assert_allclose(np.stack(rows[rid]), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert_all_pages_back(s)


def test_exhausted_pool_preempts_and_cancel_frees(tiny_ckpt: Ckpt, single: Callable[[str], ReferenceEngine]) -> None:
    engine = single("gemma3")
    batch = requests(5, fixed=dict(prompt_len=6, max_new_tokens=10))  # 15 positions, 4 pages each
    s = scheduler(tiny_ckpt, engine, "gemma3", num_pages=9, max_batch=6)  # 9 pages: 2 of them at a time
    ids = [s.submit(prompt, SamplingParams(**settings)) for prompt, settings in batch]
    doomed = s.submit([2, 3, 4, 5, 6], SamplingParams(max_new_tokens=8, ignore_eos=True))
    events: list[TokenEvent] = []
    while s.has_work():
        events += s.step()
        if sum(e.request_id == doomed for e in events) == 2:
            assert s.cancel(doomed)
        assert s.stats().pages_used <= 9
    by_id = collect(events)
    for rid, (prompt, settings) in zip(ids, batch, strict=True):
        assert tokens_of(by_id[rid]) == run_alone(engine, prompt, settings), rid
    assert by_id[doomed][-1].finish_reason == "cancelled" and len(tokens_of(by_id[doomed])) == 2
    assert s.stats().preemptions > 0
    assert_all_pages_back(s)


def test_generate_batch_equals_generate_per_prompt(tiny_ckpt: Ckpt, single: Callable[[str], ReferenceEngine]) -> None:
    engine = single("gemma3")
    prompts = [[2, 17, 99, 5], [2, 30], [2, 77, 88, 9, 10, 11, 12, 13, 14], [2, 40, 41]]
    news = [5, 3, 6, 1]
    params = [SamplingParams(max_new_tokens=n) for n in news]
    paged = paged_reference_engine(open_checkpoint(tiny_ckpt("gemma3")), passes=DEFAULT_PIPELINE, shared=engine,
                                   num_pages=pages_for_batch(prompts, params, page_size=16, max_batch=2))
    gens = generate_batch(paged, prompts, params, eos_ids=EOS, max_batch=2, keep_logits=True)
    for gen, prompt, n in zip(gens, prompts, news, strict=True):
        ref = generate(engine, prompt, n, eos_ids=EOS)
        assert (gen.prompt_ids, gen.tokens, gen.stopped_at_eos) == (prompt, ref.tokens, ref.stopped_at_eos)
        np.testing.assert_allclose(gen.logits_array(), ref.logits_array(), rtol=1e-5,
                                   atol=1e-5 * float(np.abs(ref.logits_array()).max()))
        assert gen.prefill_s > 0 and gen.decode_s >= 0


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_model_generate_batch_equals_generate(target: str, tiny_ckpt: Ckpt) -> None:
    """The public API on both engines: `generate_batch` (greedy, and one seeded sampler for all)
    gives each prompt what `generate` gives it; max_new_tokens per prompt."""
    import rlx

    model = rlx.load(tiny_ckpt("gemma3"), target)
    prompts = [[2, 17, 99, 5, 42, 200, 7], [2, 30], [2, 77, 88, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    news = [6, 3, 5]
    for make in (lambda: None, lambda: Sampler(temperature=0.9, top_k=20, seed=8)):
        gens = model.generate_batch(prompts, news, sampler=make(), max_batch=2)
        for gen, prompt, n in zip(gens, prompts, news, strict=True):
            assert gen.tokens == model.generate(prompt, n, sampler=make()).tokens
    with pytest.raises(RlxError, match="2 max_new_tokens values"):
        model.generate_batch(prompts, [1, 2])


def test_model_async_engine_streams_what_generate_gives(tiny_ckpt: Ckpt) -> None:
    import asyncio

    import rlx

    model = rlx.load(tiny_ckpt("gemma3"))
    prompts = [[2, 17, 99, 5, 42], [2, 30, 31], [2, 77, 88, 9, 10, 11, 12, 13, 14]]

    async def main() -> list[list[int]]:
        engine = model.async_engine(max_batch=2, num_pages=16, page_size=4)

        async def one(prompt: list[int]) -> list[int]:
            return [e.token async for e in engine.generate(prompt, SamplingParams(max_new_tokens=5))
                    if e.token is not None]

        out = await asyncio.gather(*(one(p) for p in prompts))
        stats = engine.stats()
        assert (stats.pages_total, stats.running, stats.pages_used) == (16, 0, 0)
        await engine.shutdown(grace_s=1)
        return out

    assert asyncio.run(main()) == [model.generate(p, 5).tokens for p in prompts]
