"""Token sampling: greedy by default; temperature, top-k and top-p with a seeded generator."""

from __future__ import annotations

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
        if self.temperature < 0:
            raise RunError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RunError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RunError(f"--top-p must be in (0, 1], got {self.top_p}")
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
