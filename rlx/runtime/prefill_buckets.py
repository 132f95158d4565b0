"""Bucketed prefill for the engines: `[specialize] SEQ = [32, 128, 512]` in the profile.

Each bucket gets a static-SEQ prefill entry (`prefill_32`...: `specialize_buckets` variants, end
padding and a one-hot last-token select; why that is exact: `rlx/runtime/dispatch.py`); a prompt
runs in the smallest bucket that holds it, and one longer than every bucket runs in the dynamic
`prefill`, which stays in the module. Static shapes let TVM unroll and vectorize the SEQ axis
and drop its bound checks; the price is compile time per bucket and up to bucket - n wasted rows.
Compiled engines (in-process and artifacts) and the reference engine use the same graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rlx.compiler.graph import HIR
from rlx.compiler.profile import Profile
from rlx.compiler.shapes import SEQ
from rlx.passes.specialize import SELECT_INPUT, specialize_buckets
from rlx.runtime.dispatch import pad_seq

PREFILL = "prefill"


def entry(bucket: int) -> str:
    return f"{PREFILL}_{bucket}"


def profile_buckets(profile: Profile | None, max_seq: int) -> tuple[int, ...]:
    """The SEQ buckets a profile asks for that fit the context (a bucket past it could never run)."""
    return tuple(b for b in (profile.buckets(SEQ) if profile is not None else ()) if b <= max_seq)


def bucket_graphs(prefill: HIR, buckets: Sequence[int]) -> dict[str, HIR]:
    """Entry name -> static prefill graph, one per bucket (none without buckets)."""
    if not buckets:
        return {}
    return {entry(b): g for b, g in specialize_buckets(prefill, SEQ, buckets).variants.items()}


def engine_graphs(graphs: Mapping[str, HIR], buckets: Sequence[int]) -> dict[str, HIR]:
    """What an engine's module holds: the dynamic prefill and decode, plus the bucket variants."""
    return {**graphs, **bucket_graphs(graphs[PREFILL], buckets)}


def choose(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding n tokens; None: run the dynamic prefill."""
    return next((b for b in sorted(buckets) if b >= n), None)


def padded_feeds(feeds: Mapping[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
    """A prompt's `input_ids` / `positions` [1, n] padded at the end to the bucket (ids with 0,
    positions continuing), plus the one-hot select of the last real token."""
    n = feeds["input_ids"].shape[1]
    out = {"input_ids": pad_seq(feeds["input_ids"], 1, bucket - n, continued=False),
           "positions": pad_seq(feeds["positions"], 1, bucket - n, continued=True)}
    select = np.zeros((1, 1, bucket), np.float32)
    select[0, 0, n - 1] = 1.0
    out[SELECT_INPUT] = select
    return out
