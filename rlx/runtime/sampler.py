"""Token sampling: greedy by default; temperature, top-k and top-p with a seeded generator.

`draw` is the one implementation of the random choice; `Sampler` (rlx run) and the batched
engine's per-request sampler (`sampling.py`) both call it, so the same seed and settings give the
same tokens through either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rlx.errors import RunError


def _head(z: np.ndarray, w: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The ids top-k then top-p keep, most likely first (ties in id order). Only the candidates
    are sorted: the `size` largest values (every tie of the smallest included), grown until they
    hold the top-p mass, so a 262k vocabulary is partitioned, never sorted whole."""
    n = z.shape[0]
    limit = top_k if 0 < top_k < n else n
    size = min(limit, 64)
    while True:
        if size >= n:
            candidates = np.arange(n)
        else:
            kth = np.partition(z, n - size)[n - size]
            candidates = np.flatnonzero(z >= kth)
        order = candidates[np.argsort(-z[candidates], kind="stable")][:limit]
        complete = order.shape[0] == limit or size >= n
        if top_p >= 1 and complete:
            return order
        total = w[order].sum() if limit < n else w.sum()  # top-k: the mass of the k kept
        mass = np.cumsum(w[order]) / total
        if top_p < 1 and (mass[-1] >= top_p or complete):
            return order[: int(np.searchsorted(mass, top_p) + 1)]
        size *= 8


def draw(z: np.ndarray, rng: np.random.Generator, *, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0) -> int:
    """Sample from softmax(z) (z: float64 logits already divided by the temperature; -inf marks a
    banned token), keeping the `top_k` most likely, then the smallest head reaching `top_p` (most
    likely first, ties in id order), then those with p >= min_p * p_max. The draw itself walks the
    kept ids in increasing id order, so sampling without top-k / top-p sorts nothing."""
    w = np.exp(z - z.max())  # p * const; 0 for a banned token; the most likely is exactly 1
    if top_k or top_p < 1:
        ids = np.sort(_head(z, w, top_k, top_p))
        kept = w[ids]
    else:
        ids, kept = None, w
    if min_p > 0:
        near = kept >= min_p  # w_max == 1
        ids, kept = (np.flatnonzero(near) if ids is None else ids[near]), kept[near]
    p = kept / kept.sum()
    return int(rng.choice(p.shape[0], p=p) if ids is None else ids[rng.choice(ids.shape[0], p=p)])


@dataclass
class Sampler:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RunError(f"--temperature must be a finite number >= 0, got {self.temperature}",
                           hint="0 for greedy decoding, e.g. 0.7 to sample")
        if self.top_k < 0:
            raise RunError(f"--top-k must be >= 0, got {self.top_k}", hint="0 keeps every token, e.g. 40")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise RunError(f"--top-p must be in (0, 1], got {self.top_p}", hint="1 keeps every token, e.g. 0.9")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RunError(f"--seed must be in 0..2**63-1, got {self.seed}", hint="e.g. --seed 42")
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)
        if self.temperature == 0:
            return int(np.argmax(logits))
        return draw(logits / self.temperature, self._rng, top_k=self.top_k, top_p=self.top_p)
