"""Engines assembled from a checkpoint, by target: the reference interpreter, or an in-process
TVM compile (`compiled_engine.CompiledEngine`, imported only when asked for: the reference
engine runs without TVM).

Every engine gets its graphs from `target_graphs`, the same graphs `rlx compile` writes into an
artifact, so all of them run the same HIR.
"""

from __future__ import annotations

from collections.abc import Callable

from rlx.compiler.graphs import target_graphs
from rlx.compiler.profile import Profile
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.runtime.buckets import DECODE, PREFILL
from rlx.runtime.engine import Engine
from rlx.runtime.reference import ReferenceEngine


def reference_engine(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                     profile: Profile | None = None) -> ReferenceEngine:
    """The numpy interpreter over the checkpoint's graphs, weights loaded once as float32."""
    graphs = target_graphs(ckpt, profile=profile, passes=passes, flow=flow)
    weights = WeightCache(ckpt.weights)
    weights.preload([n.attr("name") for g in graphs.graphs.values() for n in g.params.values()])
    return ReferenceEngine(graphs.graphs[PREFILL], graphs.graphs[DECODE], weights,
                           max_seq=ckpt.config.max_position_embeddings, vocab_size=ckpt.config.vocab_size,
                           bucketed=graphs.bucketed,
                           reports=dict(graphs.reports))


def compiled_engine(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                    profile: Profile | None = None, target: str = "cpu") -> Engine:
    """Compile in-process for this machine's CPU and run it (`rlx run CHECKPOINT --target cpu`)."""
    from rlx.compiler.compiled_engine import CompiledEngine

    return CompiledEngine(ckpt, flow, passes=passes, profile=profile, target=target)


ENGINES: dict[str, Callable[..., Engine]] = {  # (checkpoint, *, passes, profile) -> engine
    "reference": reference_engine,
    "cpu": compiled_engine,
}
