"""The batched engine's per-request sampler: the same draws as `rlx run`'s `Sampler`, and each
logits processor checked against its definition written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rlx.errors import RunError
from rlx.runtime.requests import SamplingParams
from rlx.runtime.sampler import Sampler
from rlx.runtime.sampling import RequestSampler, params_from_sampler


def _old_sampler_draw(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int,
                      top_p: float) -> int:
    """`Sampler.__call__` as it was before the batched engine (full stable argsort): the reference."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(rng.choice(order, p=p))


def _rows(n: int, vocab: int = 500, seed: int = 0, ties: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, vocab)).astype(np.float32) * 2
    return list(np.round(rows) if ties else rows)  # rounded: many ties, at the top-k boundary too


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.7, seed=1),
                                      dict(temperature=1.0, top_k=7, seed=2), dict(temperature=1.3, top_p=0.6, seed=3),
                                      dict(temperature=0.9, top_k=40, top_p=0.9, seed=4)])
@pytest.mark.parametrize("ties", [False, True])
def test_request_sampler_draws_what_rlx_run_draws(settings: dict, ties: bool) -> None:
    rows = _rows(60, ties=ties)
    run = Sampler(**settings)
    request = RequestSampler(params_from_sampler(Sampler(**settings), 60), [2, 3])
    old_rng = np.random.default_rng(settings.get("seed"))
    old = [int(np.argmax(r)) if not settings["temperature"] else
           _old_sampler_draw(r, old_rng, settings["temperature"], settings.get("top_k", 0), settings.get("top_p", 1.0))
           for r in rows]
    assert [run(r) for r in rows] == [request(r).token for r in rows] == old


def test_penalties_and_bias_follow_their_definitions() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={5: -3.0, 4: 1.0})
    s = RequestSampler(params, prompt_ids=[0, 1])
    np.testing.assert_allclose(s.process(logits), [1.0, -2.0, 0.5, 3.0, -1.0, -2.0])  # prompt: repetition only
    assert s(logits).token == 3
    assert s(np.eye(6)[1] * 10).token == 1 and s(np.eye(6)[3] * 10).token == 3  # generated: 3 twice, 1 once
    expected = [1.0, -2.0 - 0.25 - 0.5, 0.5, 3.0 / 2 - 0.5 - 0.5, -1.0, -2.0]
    np.testing.assert_allclose(s.process(logits), expected)


def test_min_p_keeps_tokens_near_the_best() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = RequestSampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0), [2])
    assert {s(logits).token for _ in range(300)} == {0, 1}  # 0.15 < 0.5 * 0.5


def test_mask_bans_tokens_and_an_empty_mask_is_an_error() -> None:
    logits = np.array([5.0, 1.0, 0.0])
    s = RequestSampler(SamplingParams(temperature=2.0, seed=0), [2])
    assert {s(logits, np.array([False, True, True])).token for _ in range(100)} == {1, 2}
    with pytest.raises(RunError, match="allows no token"):
        s(logits, np.zeros(3, dtype=bool))


def test_logprobs_are_the_log_softmax_of_the_processed_logits() -> None:
    logits = np.array([1.0, 2.0, 0.5, 2.0])
    choice = RequestSampler(SamplingParams(logprobs=3, logit_bias={2: 1.0}), [0])(logits)
    z = logits + [0, 0, 1.0, 0]
    expected = z - np.log(np.exp(z).sum())
    assert choice.token == 1 and choice.logprob == pytest.approx(expected[1])
    assert [t for t, _ in choice.top_logprobs] == [1, 3, 2]  # ties in id order
    np.testing.assert_allclose([lp for _, lp in choice.top_logprobs], expected[[1, 3, 2]])
    assert RequestSampler(SamplingParams(logprobs=0), [0])(logits).top_logprobs == ()
    masked = RequestSampler(SamplingParams(logprobs=4), [0])(logits, np.array([True, False, True, False]))
    assert [t for t, _ in masked.top_logprobs] == [0, 2]  # banned tokens are not listed
    assert RequestSampler(SamplingParams(), [0])(logits).logprob is None


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    rows = _rows(40, seed=5)
    draw = [[RequestSampler(SamplingParams(temperature=1.0, seed=s), [2])(r).token for r in rows] for s in (1, 1, 2)]
    assert draw[0] == draw[1] != draw[2]


def test_descending_order_is_the_stable_sort_with_ties_and_bans() -> None:
    """The sampler's sort (introsort, then each run of equal values put in id order) must be the
    stable argsort `rlx run` always used, or a seed would draw other tokens."""
    from rlx.runtime.sampler import _descending

    rng = np.random.default_rng(0)
    for trial in range(40):
        z = np.round(rng.standard_normal(int(rng.integers(1, 2000))) * rng.choice([1, 3, 10]))  # many ties
        if trial % 3 == 0:
            z[rng.integers(0, z.size, size=z.size // 2)] = -np.inf
        expected = np.argsort(-z, kind="stable")
        np.testing.assert_array_equal(_descending(z, 0), expected)
        k = int(rng.integers(1, z.size + 1))
        np.testing.assert_array_equal(_descending(z, k), expected[:k])
