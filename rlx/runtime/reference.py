"""The `reference` pseudo-target: prefill and decode HIR run by the numpy interpreter."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rlx.compiler.graph import HIR
from rlx.compiler.interpreter import Interpreter
from rlx.compiler.pipeline import PassReport
from rlx.compiler.profile import Profile, optimize
from rlx.errors import RunError
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow, Mode
from rlx.progress import track


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


def reference_pipelines(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                        profile: Profile | None = None) -> dict[Mode, tuple[HIR, PassReport]]:
    """Per mode, the batch-1 generation graph (last-token logits plus the KV cache) and its pass
    report: the profile's [[layers]] applied, then `passes` or else the profile's pipeline for that
    mode (with neither, no pass runs and the graphs are the builder's)."""
    base = (flow or GemmaFlow(ckpt.config, ckpt.weights.shape)).batch(1).last_token_logits().export_kv()
    if profile is not None:
        base = base.profile(profile)
    return {mode: optimize(make(base).build(), mode, profile, passes) for mode, make in _MODE_FLOWS.items()}


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
        self._kv: dict[str, np.ndarray] = {}
        self._pos = 0

    def _run(self, interp: Interpreter, ids: list[int]) -> np.ndarray:
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

    def prefill(self, ids: list[int]) -> np.ndarray:
        if not ids:
            raise RunError("empty prompt", hint="pass --prompt TEXT or --prompt-ids 2,818,...")
        self._kv, self._pos = {}, 0
        return self._run(self._prefill, ids)

    def step(self, token: int) -> np.ndarray:
        if not self._kv:
            raise RunError("step() before prefill()")
        return self._run(self._decode, [token])
