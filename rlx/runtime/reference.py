"""The `reference` pseudo-target: prefill and decode HIR run by the numpy interpreter."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from rlx.compiler.graph import HIR
from rlx.compiler.interpreter import Interpreter
from rlx.compiler.pipeline import PassReport
from rlx.compiler.profile import Profile, optimize
from rlx.compiler.shapes import PAST_SEQ, SEQ
from rlx.errors import RunError
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow, Mode
from rlx.passes.specialize import graph_symbols, record_bounds, specialize_buckets
from rlx.progress import track
from rlx.runtime.dispatch import Dispatcher, Runner
from rlx.runtime.prefill_buckets import choose, profile_buckets


class WeightCache:
    """Loads each tensor once as float32, shared by the prefill and decode graphs."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._store = ckpt.weights
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.ascontiguousarray(self._store.get(name), dtype=np.float32)
        return self._cache[name]

    def release(self, name: str) -> None:
        """Drop a tensor nobody needs any more (it would be loaded again if asked for)."""
        self._cache.pop(name, None)

    def preload(self, names: list[str]) -> None:
        """Load (dequantize) every tensor up front, with progress, so timings measure compute."""
        for name in track(sorted(set(names)), "loading weights"):
            self(name)


_MODE_FLOWS: dict[Mode, Callable[[GemmaFlow], GemmaFlow]] = {
    "prefill": lambda f: f.prefill().dynamic_seq(),
    "decode": lambda f: f.decode().dynamic_past(),
}


def context_bounds(max_seq: int) -> dict[str, int]:
    """Upper bounds of a generation engine's dims at a context of `max_seq` positions: a prefill
    of up to max_seq tokens, a decode step after up to max_seq - 1 (what `fold-rope` sizes its
    tables by, and memory planning reads)."""
    return {SEQ: max_seq, PAST_SEQ: max_seq - 1}


def reference_pipelines(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                        profile: Profile | None = None,
                        bounds: Mapping[str, int] | None = None) -> dict[Mode, tuple[HIR, PassReport]]:
    """Per mode, the batch-1 generation graph (last-token logits plus the KV cache) and its pass
    report: the profile's [[layers]] applied, `bounds` recorded (see `context_bounds`), then
    `passes` or else the profile's pipeline for that mode, either followed by the profile's
    `precision` pass when it asks for one (with neither, no pass runs and the graphs are the
    builder's)."""
    base = (flow or GemmaFlow(ckpt.config, ckpt.weights.shape)).batch(1).last_token_logits().export_kv()
    if profile is not None:
        base = base.profile(profile)
    out = {}
    for mode, make in _MODE_FLOWS.items():
        hir = make(base).build()
        if bounds:
            record_bounds(hir, {k: v for k, v in bounds.items() if k in graph_symbols(hir)})
        out[mode] = optimize(hir, mode, profile, passes, ckpt.config)
    return out


def reference_graphs(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                     profile: Profile | None = None) -> tuple[HIR, HIR]:
    """(prefill, decode) graphs; see `reference_pipelines`."""
    graphs = reference_pipelines(ckpt, flow, passes=passes, profile=profile)
    return graphs["prefill"][0], graphs["decode"][0]


class ReferenceEngine:
    name = "reference"

    def __init__(self, ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                 profile: Profile | None = None) -> None:
        self.config = ckpt.config
        self.max_seq = ckpt.config.max_position_embeddings
        weights = WeightCache(ckpt)
        graphs = reference_pipelines(ckpt, flow, passes=passes, profile=profile)
        self.reports: dict[str, PassReport] = {mode: report for mode, (_, report) in graphs.items()}
        prefill, decode = graphs["prefill"][0], graphs["decode"][0]
        weights.preload([n.attr("name") for g in (prefill, decode) for n in g.params.values()])
        self._prefill, self._decode = Interpreter(prefill, weights), Interpreter(decode, weights)
        self._buckets = profile_buckets(profile, self.max_seq)  # [specialize] SEQ: as the compiled engines
        self._bucketed = (Dispatcher(specialize_buckets(prefill, SEQ, self._buckets), lambda g: Interpreter(g, weights))
                          if self._buckets else None)
        self._kv: dict[str, np.ndarray] = {}
        self._pos = 0

    def _run(self, interp: Runner, ids: list[int]) -> np.ndarray:
        n = len(ids)
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "positions": np.arange(self._pos, self._pos + n, dtype=np.int64)[None, :],
        }
        feeds.update({k.replace("present_", "past_"): v for k, v in self._kv.items()})
        out = interp.run(feeds)
        self._kv = {k: v for k, v in out.items() if k.startswith("present_")}
        self._pos += n
        return out["logits"][0, -1]

    def prefill(self, ids: list[int], capacity: int | None = None) -> np.ndarray:
        """`capacity` is unused: the reference cache is the HIR's own, grown by concatenation."""
        if not ids:
            raise RunError("empty prompt", hint="pass --prompt TEXT or --prompt-ids 2,818,...")
        self._kv, self._pos = {}, 0
        bucketed = self._bucketed is not None and choose(len(ids), self._buckets) is not None
        return self._run(self._bucketed if bucketed else self._prefill, ids)  # type: ignore[arg-type]

    def step(self, token: int) -> np.ndarray:
        if not self._kv:
            raise RunError("step() before prefill()")
        return self._run(self._decode, [token])
