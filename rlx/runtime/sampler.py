"""Token sampling: greedy by default; temperature, top-k and top-p with a seeded generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rlx.errors import RunError


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
        z = logits / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k:
            order = order[: self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(self._rng.choice(order, p=p))
