"""Run a family of bucketed static graphs as if it were the one dynamic-SEQ graph.

`Dispatcher.run(feeds)` takes the dynamic graph's feeds (e.g. `input_ids [1, n]`, `positions
[1, n]`), picks the smallest bucket >= n, pads every SEQ axis at the END to the bucket (token
inputs with 0, i.e. the pad id; `positions` continue n, n+1, ...), runs that variant and slices
each output's SEQ axes back to the real length, so the results equal the dynamic graph's.

Why end padding is exact for real tokens: the causal mask lets a query at position q see keys at
indices k <= q only. Keys sit at positions 0..T-1 (past first), so a pad key's index is >= P + n,
past every real query position (checked), and a real row's
masked scores are dtype-min, their softmax weights are exactly 0 and pads add nothing to it.
Everything else (embedding, norms, linears, MLP, MoE routing) is per token. A sliding window only
narrows what a query sees (q-W < k <= q), so it cannot reach a pad either. Pad rows compute
garbage and are sliced away. Bidirectional layers or user masks could expose pads, so
`specialize_buckets` refuses such graphs. The last-token output is handled by the variant's
one-hot `select` input (see `rlx.passes.specialize.select_last_token`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from rlx.errors import RunError
from rlx.hir import conventions as cv
from rlx.hir.graph import HIR
from rlx.hir.shapes import PAST_SEQ, Dim, SymDim, bind_shape, eval_shape

# padded with `last + 1, last + 2, ...` so pads look like the tokens after the prompt
CONTINUED_INPUTS = (cv.POSITIONS,)


class BucketFamily(Protocol):
    """Static variants of one dynamic graph, one per bucket of `dim` (what
    `rlx.passes.specialize.specialize_buckets` makes); `select_input` names the one-hot
    last-token input, None when the graph takes no last token (read-only properties)."""

    @property
    def source(self) -> HIR: ...
    @property
    def dim(self) -> str: ...
    @property
    def variants(self) -> Mapping[int, HIR]: ...
    @property
    def select_input(self) -> str | None: ...

    @property
    def buckets(self) -> tuple[int, ...]: ...


class Runner(Protocol):
    """What runs one static variant: the interpreter, or later a compiled module."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _coefficient(d: Dim, symbol: str) -> int:
    """How many times `symbol` counts in `d`: 1 for SEQ in `PAST_SEQ+SEQ`, 0 in a static dim."""
    return dict(d.terms).get(symbol, 0) if isinstance(d, SymDim) else 0


def pad_seq(value: np.ndarray, axis: int, extra: int, continued: bool) -> np.ndarray:
    """`extra` entries more at the end of `axis`: zeros, or (`continued`) last + 1, last + 2, ..."""
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, extra)
    padded = np.pad(value, widths)
    if continued:
        steps = np.arange(1, extra + 1, dtype=value.dtype).reshape([-1 if a == axis else 1 for a in range(value.ndim)])
        tail = [slice(None)] * value.ndim
        tail[axis] = slice(value.shape[axis], None)
        padded[tuple(tail)] = np.take(value, [-1], axis=axis) + steps
    return padded


class Dispatcher:
    """Picks a bucket per call; `run` has the dynamic graph's contract (same feeds, same outputs)."""

    def __init__(self, graphs: BucketFamily, make_runner: Callable[[HIR], Runner]) -> None:
        self.graphs = graphs
        self.dim = graphs.dim
        self.buckets = graphs.buckets
        self._runners = {b: make_runner(h) for b, h in graphs.variants.items()}

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds n positions."""
        for b in self.buckets:
            if b >= n:
                return b
        raise RunError(f"prompt of {n} tokens is longer than the largest bucket {self.buckets[-1]} "
                       f"(buckets: {', '.join(map(str, self.buckets))})",
                       hint="add a larger bucket, or feed the prompt in chunks")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        source = self.graphs.source
        arrays = {k: np.asarray(v) for k, v in feeds.items()}
        env: dict[str, int] = {}
        for name, node in source.inputs.items():
            if name in arrays:
                try:
                    bind_shape(node.type.shape, arrays[name].shape, env, f"input {name}")
                except ValueError as e:
                    raise RunError(str(e), hint="feed inputs of the graph's shapes") from None
        n = env.get(self.dim)
        if not n:
            raise RunError(f"no {self.dim} positions to run (empty prompt or no input with a {self.dim} axis)",
                           hint="pass at least one token")
        bucket = self.bucket_for(n)
        first_pad = env.get(PAST_SEQ, 0) + n
        positions = arrays.get(cv.POSITIONS)
        if positions is not None and positions.size and int(positions.max()) >= first_pad:
            raise RunError(f"positions reach {int(positions.max())}, but keys end at {first_pad - 1}: "
                           "padded keys would become visible", hint="positions must be past + 0..n-1")
        extra = bucket - n
        padded = dict(arrays)
        for name, node in source.inputs.items():
            for axis, d in enumerate(node.type.shape):
                if name in padded and (c := _coefficient(d, self.dim)):
                    padded[name] = pad_seq(padded[name], axis, c * extra, name in CONTINUED_INPUTS)
        if (select := self.graphs.select_input) is not None:  # one-hot on the last real position
            one_hot = np.zeros(eval_shape(self.graphs.variants[bucket].inputs[select].type.shape, env), np.float32)
            one_hot[..., n - 1] = 1.0
            padded[select] = one_hot
        out = self._runners[bucket].run(padded)
        return {name: self._unpad(out[name], source.node(nid).type.shape, extra)
                for name, nid in source.outputs.items()}

    def _unpad(self, value: np.ndarray, shape: tuple[Dim, ...], extra: int) -> np.ndarray:
        """Drop the pads from every axis the dim runs along (they are last, also after a past)."""
        index = [slice(None)] * value.ndim
        for axis, d in enumerate(shape):
            if c := _coefficient(d, self.dim):
                index[axis] = slice(0, value.shape[axis] - c * extra)
        return value[tuple(index)]
