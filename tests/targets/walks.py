"""The walk every compiled-vs-reference test takes: one prompt, then teacher-forced decode steps."""

from __future__ import annotations

import numpy as np

from rlx.runtime.engine import Engine

PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]  # longer than the tiny models' sliding window (4)
N_DECODE = 8
FAMILIES = ["gemma1-gqa", "gemma2", "gemma3", "gemma4", "gemma4-moe"]


def assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal within `rtol`, with an absolute floor of rtol x max|ref| (near-zero logits)."""
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def walk(engine: Engine, tokens: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Prefill PROMPT, then N_DECODE steps on `tokens` (default: this engine's own greedy picks):
    the [1 + N_DECODE, vocab] logits and the tokens fed."""
    rows = [engine.prefill(PROMPT)]
    fed: list[int] = []
    for i in range(N_DECODE):
        fed.append(tokens[i] if tokens else int(np.argmax(rows[-1])))
        rows.append(engine.step(fed[-1]))
    return np.stack(rows), fed
