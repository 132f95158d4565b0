"""Bucketed prefill at run time: `[specialize] SEQ = [32, 128, 512]` in the profile.

Each bucket is a static-SEQ prefill entry (`prefill_32`...; built by `rlx.compiler.graphs` from
`specialize_buckets` variants: end padding and a one-hot last-token select, exact for the reasons
`rlx/runtime/dispatch.py` gives); a prompt runs in the smallest bucket that holds it, one longer
than every bucket in the dynamic `prefill`, which stays in the module. Static shapes let TVM
unroll and vectorize the SEQ axis and drop its bound checks; the price is compile time per
bucket and up to bucket - n wasted rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

from rlx.hir import conventions as cv
from rlx.runtime.dispatch import pad_seq

PREFILL: Final = "prefill"  # Final: their types are the literals, i.e. flow.Mode's values
DECODE: Final = "decode"

PREFILL_CHUNK = 512
"""Prompt tokens per prefill call: llama.cpp's default micro-batch. Rows enough for the GEMMs to
run at full speed, few enough that the activations (the MLP's [512, 2 x 2048] on gemma-3-270m:
8 MB) and the sliding-window rings (W + 511 rows) stay small."""


def entry(bucket: int) -> str:
    return f"{PREFILL}_{bucket}"


def choose(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding n tokens; None: run the dynamic prefill."""
    return next((b for b in sorted(buckets) if b >= n), None)


def longest_call(buckets: Sequence[int], max_seq: int, chunk: int = PREFILL_CHUNK) -> int:
    """The most tokens one prefill call runs when prompts go in chunks of `chunk`: a chunk padded
    to the smallest bucket holding it; never past the context. (What a sliding-window ring must
    hold beyond its window, and the activations a call needs.)"""
    chunk = min(chunk, max_seq)
    return min(max_seq, choose(chunk, buckets) or chunk)


def padded_feeds(feeds: Mapping[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
    """A prompt's `input_ids` / `positions` [1, n] padded at the end to the bucket (ids with 0,
    positions continuing), plus the one-hot select of the last real token."""
    n = feeds[cv.INPUT_IDS].shape[1]
    out = {cv.INPUT_IDS: pad_seq(feeds[cv.INPUT_IDS], 1, bucket - n, continued=False),
           cv.POSITIONS: pad_seq(feeds[cv.POSITIONS], 1, bucket - n, continued=True)}
    select = np.zeros((1, 1, bucket), np.float32)
    select[0, 0, n - 1] = 1.0
    out[cv.LAST_TOKEN_SELECT] = select
    return out
