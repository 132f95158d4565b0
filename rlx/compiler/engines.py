"""Engines assembled from a checkpoint, by target: the reference interpreter, or an in-process
TVM compile (`compiled_engine.CompiledEngine`, imported only when asked for: the reference
engine runs without TVM).

Every engine gets its graphs from `target_graphs`, the same graphs `rlx compile` writes into an
artifact, so all of them run the same HIR.
"""

from __future__ import annotations

from collections.abc import Callable

from rlx.compiler.graphs import paged_graphs, target_graphs
from rlx.compiler.profile import Profile
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.paged import DEFAULT_PAGE_SIZE
from rlx.frontends.weights import WeightCache
from rlx.runtime.buckets import DECODE, PREFILL
from rlx.runtime.engine import Engine
from rlx.runtime.paged_engine import PagedEngine, PagedReferenceEngine
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


def paged_reference_engine(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, num_pages: int,
                           page_size: int = DEFAULT_PAGE_SIZE, passes: str | None = None,
                           profile: Profile | None = None, max_seq: int | None = None,
                           shared: ReferenceEngine | None = None) -> PagedReferenceEngine:
    """The interpreter over the checkpoint's paged step graph (`paged_graphs`: the same profile and
    passes as `reference_engine`); `shared`: a reference engine of the same checkpoint whose
    weights (float32 and quantized copies) it reads instead of loading its own."""
    graphs = paged_graphs(ckpt, profile=profile, passes=passes, flow=flow, page_size=page_size, max_seq=max_seq,
                          buckets=())
    if shared is not None:
        weights, quantized = shared.weights, shared.quantized
    else:
        weights, quantized = WeightCache(ckpt.weights), None
        weights.preload([n.attr("name") for n in graphs.graph.params.values()])
    return PagedReferenceEngine(graphs.graph, weights, num_pages=num_pages, vocab_size=ckpt.config.vocab_size,
                                quantized=quantized)


def compiled_engine(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                    profile: Profile | None = None, target: str = "cpu") -> Engine:
    """Compile in-process for this machine's CPU and run it (`rlx run CHECKPOINT --target cpu`)."""
    from rlx.compiler.compiled_engine import CompiledEngine

    return CompiledEngine(ckpt, flow, passes=passes, profile=profile, target=target)


ENGINES: dict[str, Callable[..., Engine]] = {  # (checkpoint, *, passes, profile) -> engine
    "reference": reference_engine,
    "cpu": compiled_engine,
}


def _paged_reference(ckpt: Checkpoint, shared: Engine, *, num_pages: int, page_size: int, passes: str | None,
                     profile: Profile | None) -> PagedEngine:
    return paged_reference_engine(ckpt, num_pages=num_pages, page_size=page_size, passes=passes, profile=profile,
                                  shared=shared if isinstance(shared, ReferenceEngine) else None)


def _paged_compiled(ckpt: Checkpoint, shared: Engine, *, num_pages: int, page_size: int, passes: str | None,
                    profile: Profile | None) -> PagedEngine:
    from rlx.compiler.compiled_engine import CompiledEngine, compiled_paged_engine

    single = shared if isinstance(shared, CompiledEngine) else None
    return compiled_paged_engine(ckpt, num_pages=num_pages, page_size=page_size, passes=passes, profile=profile,
                                 target=single.name if single is not None else "cpu", shared=single)


PAGED_ENGINES: dict[str, Callable[..., PagedEngine]] = {
    # (checkpoint, the target's single-sequence engine (weights to share), *, num_pages, page_size, passes, profile)
    "reference": _paged_reference,
    "cpu": _paged_compiled,
}
