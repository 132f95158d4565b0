"""The page pool, the prefix cache and the continuous-batching scheduler, on a toy paged model.

References are computed without the scheduler: `reference_logits(tokens)` of the toy and a plain
loop with the request's own sampler (its equality with `rlx run`'s `Sampler` is in
test_request_sampler.py). After every scenario, `assert_all_pages_back` checks that no sequence
holds a page and that the prefix cache gives all of its pages back.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlx.runtime.kv_pages import PagePool
from rlx.runtime.prefix_cache import ROOT, PrefixCache
from rlx.runtime.requests import RequestError, SamplingParams, TokenEvent
from rlx.runtime.sampling import RequestSampler
from rlx.runtime.scheduler import QueueFull, Scheduler
from tests.runtime.toy_paged import ToyPagedModel, reference_logits

EOS = 1


def alone(prompt: list[int], params: SamplingParams, vocab: int = 40, eos: tuple[int, ...] = (EOS,)) -> list[int]:
    """The request run by itself, without pages or a scheduler."""
    sampler, tokens, out = RequestSampler(params, prompt), list(prompt), []
    while True:
        token = sampler(reference_logits(tokens, vocab)).token
        out.append(token)
        tokens.append(token)
        if (token in eos and not params.ignore_eos) or token in params.stop_ids or len(out) == params.max_new_tokens:
            return out


def collect(events: list[TokenEvent]) -> dict[str, list[TokenEvent]]:
    out: dict[str, list[TokenEvent]] = {}
    for e in events:
        out.setdefault(e.request_id, []).append(e)
    return out


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


def assert_all_pages_back(s: Scheduler) -> None:
    stats = s.stats()
    assert stats.running == stats.waiting == stats.pages_used == 0
    if s.cache is not None:
        s.cache.clear()
    assert s.pool.num_free == s.pool.num_pages
    assert all(s.pool.refcount(p) == 0 for p in range(s.pool.num_pages))


def mixed_requests(n: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """`n` requests of different prompt / output lengths and sampling settings."""
    rng = np.random.default_rng(seed)
    settings = [dict(), dict(temperature=0.8, seed=11), dict(temperature=1.2, top_k=5, seed=3),
                dict(temperature=0.9, top_p=0.8, min_p=0.05, seed=7),
                dict(temperature=1.0, seed=5, presence_penalty=0.5, frequency_penalty=0.3),
                dict(repetition_penalty=1.3, logit_bias={3: 2.0, EOS: -100}), dict(stop_ids=(5, 6), temperature=1.0,
                                                                                seed=9)]
    out = []
    for i in range(n):
        prompt = rng.integers(2, 40, size=int(rng.integers(1, 23))).tolist()
        out.append((prompt, SamplingParams(max_new_tokens=int(rng.integers(1, 14)), **settings[i % len(settings)])))
    return out


# -- the pool and the prefix cache -------------------------------------------------------------

def test_pool_allocates_all_or_nothing_and_frees_on_last_release() -> None:
    pool = PagePool(4, 2)
    a = pool.allocate(3)
    assert a is not None and pool.num_free == 1 and pool.allocate(2) is None and pool.num_free == 1
    pool.retain(a[0])
    pool.release(a)
    assert pool.num_free == 3 and pool.refcount(a[0]) == 1
    pool.release([a[0]])
    assert pool.num_free == 4 and pool.pages_for(5) == 3
    with pytest.raises(AssertionError):
        pool.release([a[0]])


def test_prefix_cache_keys_are_chains_and_eviction_is_lru() -> None:
    pool = PagePool(6, 2)
    cache = PrefixCache(pool)
    p = pool.allocate(3)
    assert p is not None
    n0 = cache.insert(ROOT, [5, 6], p[0])
    n1 = cache.insert(n0, [7, 8], p[1])
    assert cache.insert(ROOT, [7, 8], p[2]) != n1  # the same tokens after another prefix: another page
    assert [c.page for c in cache.lookup([5, 6, 7, 8, 9])] == [p[0], p[1]]
    assert [c.page for c in cache.lookup([5, 6, 7, 8])] == [p[0]]  # the last token is always computed
    assert cache.lookup([6, 5, 7, 8, 9]) == []
    assert cache.insert(ROOT, [5, 6], p[2]) == n0 and pool.refcount(p[2]) == 2  # a duplicate is not kept
    pool.release(p)  # the sequences end: only the cache holds pages now
    assert cache.num_evictable() == 3 and pool.num_free == 3
    cache.lookup([7, 8, 1])  # touch the ROOT->[7, 8] page: [5, 6] and [5, 6, 7, 8] go first
    assert cache.evict(2) == 2 and [c.page for c in cache.lookup([7, 8, 1])] == [p[2]]
    assert cache.lookup([5, 6, 7]) == []
    assert cache.clear() == 1 and pool.num_free == 6


# -- the scheduler -----------------------------------------------------------------------------

def test_sixteen_concurrent_requests_equal_each_request_alone() -> None:
    requests = mixed_requests(16)
    s = Scheduler(ToyPagedModel(), max_batch=16, max_tokens_per_step=24, eos_ids=(EOS,))
    ids = [s.submit(prompt, params) for prompt, params in requests]
    by_id = collect(list(s.run()))
    for rid, (prompt, params) in zip(ids, requests, strict=True):
        events = by_id[rid]
        assert tokens_of(events) == alone(prompt, params), rid
        assert [e.index for e in events] == list(range(len(events)))
        assert events[-1].finish_reason in ("stop", "length") and not any(e.finished for e in events[:-1])
    assert max(b.num_seqs for b in s.model.steps) > 8  # they did run together
    assert_all_pages_back(s)


def test_long_prompt_is_chunked_and_does_not_stall_decodes() -> None:
    model = ToyPagedModel()
    s = Scheduler(model, max_batch=4, max_tokens_per_step=8, eos_ids=())
    short = s.submit([3, 4], SamplingParams(max_new_tokens=12))
    list(s.step() for _ in range(2))  # short is decoding now
    long_prompt = list(range(2, 40)) + list(range(2, 20))
    long = s.submit(long_prompt, SamplingParams(max_new_tokens=2))
    events: list[TokenEvent] = []
    for _ in range(4):
        step = s.step()
        assert [e.request_id for e in step if e.token is not None] == [short]  # a token every step
        assert model.steps[-1].num_tokens <= 8
        events += step
    events += list(s.run())
    by_id = collect(events)
    assert tokens_of(by_id[long]) == alone(long_prompt, SamplingParams(max_new_tokens=2), eos=())
    assert_all_pages_back(s)


def test_prefix_cache_reuses_pages_and_gives_the_same_logits() -> None:
    rows: dict[str, list[np.ndarray]] = {}
    s = Scheduler(ToyPagedModel(page_size=4), eos_ids=(), on_logits=lambda rid, row: rows.setdefault(rid, []).append(row))
    system = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]  # two full pages and a half
    first = s.submit([*system, 20], SamplingParams(max_new_tokens=3))
    list(s.run())
    second_prompt = [*system, 21, 22]
    second = s.submit(second_prompt, SamplingParams(max_new_tokens=4))
    by_id = collect(list(s.run()))
    stats = s.stats()
    assert stats.prefix_queries == 11 + 12 and stats.prefix_hits == 8  # the two full pages of the system prompt
    generated = tokens_of(by_id[second])
    for i, row in enumerate(rows[second]):
        np.testing.assert_array_equal(row, reference_logits([*second_prompt, *generated[:i]], 40))
    assert generated == alone(second_prompt, SamplingParams(max_new_tokens=4), eos=())
    assert first in rows
    assert_all_pages_back(s)


def test_generated_tokens_are_cached_too() -> None:
    """A chat's next turn starts with the previous turn's prompt AND reply: both are reused."""
    s = Scheduler(ToyPagedModel(page_size=2), eos_ids=())
    prompt = [5, 6, 7]
    rid = s.submit(prompt, SamplingParams(max_new_tokens=6))
    reply = tokens_of(collect(list(s.run()))[rid])
    turn2 = [*prompt, *reply, 9]
    s.submit(turn2, SamplingParams(max_new_tokens=1))
    list(s.run())
    assert s.stats().prefix_hits == 8  # positions 0..7 had K/V written (the last reply token was never fed)
    assert_all_pages_back(s)


def test_full_pool_makes_requests_wait_and_preempts_with_identical_tokens() -> None:
    requests = mixed_requests(10, seed=3)
    # 12 pages of 4: one request needs at most ceil((22 + 13 - 1) / 4) = 9; ten cannot all fit
    s = Scheduler(ToyPagedModel(num_pages=12), max_batch=8, max_tokens_per_step=16, eos_ids=(EOS,))
    ids = [s.submit(prompt, params) for prompt, params in requests]
    peak = 0
    events: list[TokenEvent] = []
    while s.has_work():
        events += s.step()
        stats = s.stats()
        peak = max(peak, stats.pages_used)
        assert stats.pages_used + stats.pages_cached <= 12
    by_id = collect(events)
    for rid, (prompt, params) in zip(ids, requests, strict=True):
        assert tokens_of(by_id[rid]) == alone(prompt, params), rid
    assert s.stats().preemptions > 0 and peak == 12
    assert_all_pages_back(s)


def test_cancel_mid_decode_frees_pages_at_once() -> None:
    s = Scheduler(ToyPagedModel(), eos_ids=())
    keep = s.submit([3, 4, 5], SamplingParams(max_new_tokens=10))
    drop = s.submit(list(range(2, 12)), SamplingParams(max_new_tokens=10))
    events = [e for _ in range(4) for e in s.step()]
    used = s.stats().pages_used
    assert s.cancel(drop) and not s.cancel(drop) and not s.cancel("nope")
    assert s.stats().pages_used < used and s.stats().running == 1
    by_id = collect(events + list(s.run()))
    assert len(tokens_of(by_id[drop])) == 4 and by_id[drop][-1] == TokenEvent(drop, 4, None, finish_reason="cancelled")
    assert tokens_of(by_id[keep]) == alone([3, 4, 5], SamplingParams(max_new_tokens=10), eos=())
    waiting = s.submit([3], SamplingParams())
    assert s.cancel(waiting) and collect(s.step())[waiting][0].finish_reason == "cancelled"
    assert_all_pages_back(s)


@pytest.mark.parametrize("during", ["forward", "sampling"])
def test_cancel_during_a_step_frees_pages_when_it_returns(during: str) -> None:
    """The step's forward and its sampling run without the lock: a cancel then only marks the request."""
    s = Scheduler(ToyPagedModel(), eos_ids=())
    rid = s.submit([3, 4, 5], SamplingParams(max_new_tokens=10))
    forward = s.model.forward

    def cancel(*_: object) -> None:
        assert s.cancel(rid)
        assert s.stats().pages_used > 0  # the step still uses them

    def cancelling(batch):  # noqa: ANN001, ANN202
        cancel()
        return forward(batch)

    if during == "forward":
        s.model.forward = cancelling
    else:
        s.on_logits = cancel
    assert s.step() == [TokenEvent(rid, 0, None, finish_reason="cancelled")]
    assert_all_pages_back(s)


@pytest.mark.parametrize("prompt, max_new, param", [(list(range(2, 40)) * 3, 1, "prompt"),
                                                    ([3] * 90, 10, "max_new_tokens"), ([], 1, "prompt"),
                                                    ([3, 40], 1, "prompt"), ([3], 0, "max_new_tokens")])
def test_requests_that_cannot_fit_are_refused_naming_the_field(prompt: list[int], max_new: int, param: str) -> None:
    s = Scheduler(ToyPagedModel(), eos_ids=())
    with pytest.raises(RequestError) as e:
        s.submit(prompt, SamplingParams(max_new_tokens=max_new))
    assert e.value.param == param and e.value.hint
    assert not s.has_work()


def test_a_request_larger_than_the_whole_pool_is_refused() -> None:
    s = Scheduler(ToyPagedModel(num_pages=3), eos_ids=())
    with pytest.raises(RequestError, match="needs 4 KV pages"):
        s.submit([3] * 10, SamplingParams(max_new_tokens=4))


def test_full_queue_raises_queue_full_and_ids_are_unique() -> None:
    s = Scheduler(ToyPagedModel(), max_queue=2, eos_ids=())
    s.submit([3], SamplingParams())
    s.submit([3], SamplingParams(), request_id="b")
    with pytest.raises(RequestError, match="in use") as e:
        s.submit([3], SamplingParams(), request_id="b")
    assert e.value.param == "request_id"
    with pytest.raises(QueueFull):
        s.submit([3], SamplingParams())
    assert s.cancel("b")
    s.submit([3], SamplingParams(), request_id="b")  # free again
    list(s.run())
    assert_all_pages_back(s)


def test_one_finishing_at_max_tokens_in_the_step_another_joins() -> None:
    s = Scheduler(ToyPagedModel(), max_batch=3, eos_ids=())
    requests = {"a": (list(range(2, 10)), 3), "b": ([4, 5, 6, 7, 8, 9, 10], 4), "c": ([6, 7, 8], 2)}
    for rid in "ab":
        s.submit(requests[rid][0], SamplingParams(max_new_tokens=requests[rid][1]), request_id=rid)
    events = s.step() + s.step()
    s.submit(requests["c"][0], SamplingParams(max_new_tokens=requests["c"][1]), request_id="c")
    third = s.step()
    assert s.model.steps[-1].num_seqs == 3 and s.stats().running == 2
    assert collect(third)["a"][-1].finish_reason == "length" and collect(third)["c"][0].index == 0
    by_id = collect(events + third + list(s.run()))
    for rid, (prompt, n) in requests.items():
        assert tokens_of(by_id[rid]) == alone(prompt, SamplingParams(max_new_tokens=n), eos=())
    assert_all_pages_back(s)


def test_nan_logits_end_that_request_with_an_error_only() -> None:
    model = ToyPagedModel()
    forward = model.forward

    def poisoned(batch):  # noqa: ANN001, ANN202
        out = forward(batch)
        out[0, 3] = np.nan
        return out

    s = Scheduler(model, eos_ids=())
    bad = s.submit([3, 4], SamplingParams(max_new_tokens=3))
    good = s.submit([5, 6], SamplingParams(max_new_tokens=3))
    model.forward = poisoned
    first = collect(s.step())
    model.forward = forward
    assert first[bad][0].finish_reason == "error" and "NaN" in first[bad][0].error
    assert tokens_of(first[good] + list(s.run())) == alone([5, 6], SamplingParams(max_new_tokens=3), eos=())
    assert_all_pages_back(s)


def test_eos_stops_and_ignore_eos_does_not() -> None:
    prompt = [3, 4]
    free = alone(prompt, SamplingParams(max_new_tokens=12), eos=())
    eos = free[3]
    s = Scheduler(ToyPagedModel(), eos_ids=(eos,))
    stopped = s.submit(prompt, SamplingParams(max_new_tokens=12))
    ignoring = s.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    by_id = collect(list(s.run()))
    assert tokens_of(by_id[stopped]) == free[: free.index(eos) + 1] and by_id[stopped][-1].finish_reason == "stop"
    assert tokens_of(by_id[ignoring]) == free and by_id[ignoring][-1].finish_reason == "length"
    assert_all_pages_back(s)


class _Only:
    """A constraint allowing a fixed token sequence, then terminating."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)

    def allowed(self, vocab_size: int) -> np.ndarray:
        mask = np.zeros(vocab_size, dtype=bool)
        mask[self.script[0]] = True
        return mask

    def accept(self, token: int) -> None:
        assert token == self.script.pop(0)

    def is_terminated(self) -> bool:
        return not self.script


def test_constraint_masks_and_terminates() -> None:
    s = Scheduler(ToyPagedModel(), eos_ids=())
    rid = s.submit([3, 4], SamplingParams(max_new_tokens=10, temperature=1.0, seed=1, logprobs=2),
                   constraint=_Only([9, 8, 7]))
    events = collect(list(s.run()))[rid]
    assert tokens_of(events) == [9, 8, 7] and events[-1].finish_reason == "stop"
    assert all(e.logprob == 0.0 and e.top_logprobs[0] == (e.token, 0.0) for e in events)
    assert_all_pages_back(s)


def test_requests_sharing_a_prompt_compute_its_pages_once() -> None:
    """`n` completions of one prompt arriving together: the twins wait for the first's pages."""
    model = ToyPagedModel(page_size=4)
    s = Scheduler(model, eos_ids=())
    prompt = list(range(2, 15))  # 13 tokens: 3 full pages
    settings = [SamplingParams(max_new_tokens=5, temperature=1.0, seed=i) for i in range(4)]
    ids = [s.submit(prompt, params) for params in settings]
    by_id = collect(list(s.run()))
    for rid, params in zip(ids, settings, strict=True):
        assert tokens_of(by_id[rid]) == alone(prompt, params, eos=())
    assert s.stats().prefix_hits == 3 * 12
    assert sum(b.num_tokens for b in model.steps) == 13 + 3 * 1 + 4 * 4  # one prefill, 3 last tokens, decodes
    assert_all_pages_back(s)


def test_an_engine_failure_ends_that_steps_requests_and_the_next_run() -> None:
    model = ToyPagedModel()
    forward = model.forward

    def broken(batch):  # noqa: ANN001, ANN202
        model.forward = forward
        raise RuntimeError("kernel exploded")

    s = Scheduler(model, eos_ids=())
    first = [s.submit([3, 4], SamplingParams(max_new_tokens=3)) for _ in range(2)]
    model.forward = broken
    failed = s.step()
    assert [(e.request_id, e.finish_reason) for e in failed] == [(rid, "error") for rid in first]
    assert "kernel exploded" in failed[0].error
    assert_all_pages_back(s)
    again = s.submit([3, 4], SamplingParams(max_new_tokens=3))
    assert tokens_of(collect(list(s.run()))[again]) == alone([3, 4], SamplingParams(max_new_tokens=3), eos=())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_traffic_keeps_every_invariant(data: st.DataObject) -> None:
    """Random pools, budgets, prompts sharing prefixes, sampling settings, cancels between steps:
    every request that completes has the tokens it has alone, the pool never over-commits, and
    everything is given back."""
    page = data.draw(st.sampled_from([1, 2, 4]), label="page_size")
    tight = -(-(14 + 12 - 1) // page)  # the largest request below fills the pool alone
    s = Scheduler(ToyPagedModel(num_pages=tight + data.draw(st.integers(0, 12), label="spare pages"), page_size=page,
                                max_seq=48),
                  max_batch=data.draw(st.integers(1, 6), label="max_batch"),
                  max_tokens_per_step=data.draw(st.integers(6, 20), label="budget"), eos_ids=(EOS,),
                  prefix_cache=data.draw(st.booleans(), label="prefix_cache"))
    stems = [[2, 3, 4, 5, 6, 7, 8, 9], [2, 3, 4, 5, 10, 11, 12, 13]]
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    events: list[TokenEvent] = []
    cancelled: set[str] = set()
    for _ in range(data.draw(st.integers(1, 30), label="rounds")):
        for _ in range(data.draw(st.integers(0, 3))):
            stem = data.draw(st.sampled_from(stems))
            prompt = stem[:data.draw(st.integers(1, 8))] + data.draw(st.lists(st.integers(2, 39), max_size=6))
            settings = data.draw(st.sampled_from([dict(), dict(temperature=1.0, seed=3), dict(top_k=3, temperature=2.0,
                                                                                            seed=5)]))
            params = SamplingParams(max_new_tokens=data.draw(st.integers(1, 12)), **settings)
            requests[s.submit(prompt, params)] = (prompt, params)
        if requests and data.draw(st.integers(0, 15)) == 0:
            victim = data.draw(st.sampled_from(sorted(requests)))
            if s.cancel(victim):
                cancelled.add(victim)
        events += s.step()
        stats = s.stats()
        assert stats.pages_used + stats.pages_cached + s.pool.num_free == s.pool.num_pages
    events += list(s.run())
    by_id = collect(events)
    for rid, (prompt, params) in requests.items():
        assert by_id[rid][-1].finished and sum(e.finished for e in by_id[rid]) == 1
        if rid not in cancelled:
            assert tokens_of(by_id[rid]) == alone(prompt, params), rid
        else:
            assert tokens_of(by_id[rid]) == alone(prompt, params)[:len(tokens_of(by_id[rid]))]
    assert_all_pages_back(s)


def test_first_token_carries_the_queue_time_of_a_request_that_waited() -> None:
    s = Scheduler(ToyPagedModel(), max_batch=1, max_tokens_per_step=24, eos_ids=())
    first = s.submit([1, 2, 3], SamplingParams(max_new_tokens=3))
    second = s.submit([4, 5], SamplingParams(max_new_tokens=2))  # waits: one sequence at a time
    by_id = collect(list(s.run()))
    for rid in (first, second):
        events = [e for e in by_id[rid] if e.token is not None]
        assert events[0].queued_s is not None and events[0].queued_s >= 0
        assert all(e.queued_s is None for e in events[1:])
    waited = [e for e in by_id[second] if e.token is not None][0].queued_s
    assert waited > [e for e in by_id[first] if e.token is not None][0].queued_s  # behind 3 steps of the first
