"""The batched engine's per-request sampler: the same draws as `rlx run`'s `Sampler`, and each
logits processor checked against its definition written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rlx.errors import RunError
from rlx.runtime.requests import SamplingParams
from rlx.runtime.sampler import Sampler
from rlx.runtime.sampling import RequestSampler, params_from_sampler


def _reference_draw(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int,
                    top_p: float, min_p: float = 0.0) -> int:
    """The draw's definition written out with a full stable argsort of the vocabulary: the kept
    set (top-k, then the head reaching top-p, then min-p), drawn over in increasing id order."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    w = np.exp(z - z.max())
    order = np.argsort(-z, kind="stable")
    ids = np.arange(z.shape[0])
    if top_k or top_p < 1:
        order = order[:top_k] if top_k else order
        if top_p < 1:
            total = w[order].sum() if 0 < top_k < z.shape[0] else w.sum()
            order = order[: int(np.searchsorted(np.cumsum(w[order]) / total, top_p) + 1)]
        ids = np.sort(order)
    kept = w[ids]
    if min_p:
        ids, kept = ids[kept >= min_p], kept[kept >= min_p]
    return int(ids[rng.choice(ids.shape[0], p=kept / kept.sum())])


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
    ref_rng = np.random.default_rng(settings.get("seed"))
    expected = [int(np.argmax(r)) if not settings["temperature"] else
                _reference_draw(r, ref_rng, settings["temperature"], settings.get("top_k", 0),
                                settings.get("top_p", 1.0))
                for r in rows]
    assert [run(r) for r in rows] == [request(r).token for r in rows] == expected


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


def test_kept_head_is_the_stable_sort_s_with_ties_and_bans() -> None:
    """The sampler's head (partitioned candidates, grown until they hold the top-p mass) must be
    what a full stable argsort keeps, or truncation would keep other tokens."""
    from rlx.runtime.sampler import _head

    rng = np.random.default_rng(0)
    for trial in range(60):
        z = np.round(rng.standard_normal(int(rng.integers(1, 3000))) * rng.choice([1, 3, 10]))  # many ties
        if trial % 3 == 0:
            z[rng.integers(0, z.size, size=z.size // 2)] = -np.inf
            z[0] = 0.0  # at least one token stays allowed
        w = np.exp(z - z.max())
        expected = np.argsort(-z, kind="stable")
        k = int(rng.integers(1, z.size + 1))
        np.testing.assert_array_equal(_head(z, w, k, 1.0), expected[:k])
        top_p = float(rng.uniform(0.05, 0.999))
        mass = np.cumsum(w[expected]) / w.sum()
        np.testing.assert_array_equal(_head(z, w, 0, top_p), expected[: int(np.searchsorted(mass, top_p) + 1)])


def test_min_p_reference_draws_match() -> None:
    rows = _rows(40, seed=5)
    sampler = RequestSampler(SamplingParams(max_new_tokens=40, temperature=1.1, min_p=0.1, seed=9), [2])
    ref_rng = np.random.default_rng(9)
    assert [sampler(r).token for r in rows] == [_reference_draw(r, ref_rng, 1.1, 0, 1.0, 0.1) for r in rows]
