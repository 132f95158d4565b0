"""The graphs an engine or artifact needs, built once for every caller.

`target_graphs` is the sequence `rlx compile`, the in-process compiled engine, the reference
engine and `rlx compare` share: the batch-1 generation graphs (prefill with a dynamic SEQ, decode
with a dynamic PAST_SEQ; last-token logits, KV cache exported), the profile's `[[layers]]`
applied to the flow, context bounds recorded, the pass pipeline run (`--passes`, else the
profile's `[backend.<target>] passes`, else its per-mode pipeline; either followed by the
profile's `precision` pass), and the `[specialize] SEQ` bucket variants of the prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from rlx.compiler.profile import BackendOptions, Profile
from rlx.frontends.checkpoint import Checkpoint
from rlx.frontends.config import GemmaConfig
from rlx.frontends.flow import GemmaFlow, Mode
from rlx.frontends.paged import DEFAULT_PAGE_SIZE
from rlx.hir.graph import HIR
from rlx.hir.pass_infra import PassError, parse_pipeline
from rlx.hir.pass_manager import PassManager, PassReport
from rlx.hir.shapes import PAST_SEQ, SEQ, SEQS
from rlx.passes.specialize import BucketedGraphs, bind, graph_symbols, record_bounds, specialize_buckets
from rlx.runtime.buckets import DECODE, PREFILL, entry
from rlx.runtime.paged_engine import STEP, step_entry

MODE_FLOWS: dict[Mode, Callable[[GemmaFlow], GemmaFlow]] = {
    # prefill appends a chunk of the prompt to the cache (PAST_SEQ: what earlier chunks wrote),
    # so a long prompt runs in chunks of bounded activation memory (`VMEngine.prefill`)
    PREFILL: lambda f: f.prefill().dynamic_seq().dynamic_past(),
    DECODE: lambda f: f.decode().dynamic_past(),
}


def context_bounds(max_seq: int) -> dict[str, int]:
    """Upper bounds of a generation engine's dims at a context of `max_seq` positions: a prefill
    of up to max_seq tokens, a decode step after up to max_seq - 1 (what `fold-rope` sizes its
    tables by, and memory planning reads)."""
    return {SEQ: max_seq, PAST_SEQ: max_seq - 1}


def run_pipeline(hir: HIR, mode: Mode, profile: Profile | None = None, passes: str | None = None,
                 config: GemmaConfig | None = None) -> tuple[HIR, PassReport]:
    """Run `passes` (default: the profile's pipeline for mode; no profile: nothing) through
    PassManager. With [fusion] assert_clean, a fusion pattern that matched half-way is an error.

    The profile's precision is part of the model it asks for, not a pass choice: explicit
    `passes` get its `precision` pass appended too, except the empty pipeline, which asks for
    the graph as built (`rlx inspect --passes ""`, compile's `before.hir`). `config` (the
    checkpoint's GemmaConfig) resolves `[[layers]] dtype` patches."""
    if passes is None:
        text = profile.pipeline_text(mode, config=config) if profile else ""
    else:
        text = profile.with_precision(passes, config) if profile and passes.strip() else passes
    clean = profile is not None and profile.fusion.assert_clean
    return PassManager(parse_pipeline(text), assert_clean=clean).run(hir)


def profile_buckets(profile: Profile | None, max_seq: int) -> tuple[int, ...]:
    """The SEQ buckets a profile asks for that fit the context (a bucket past it could never run)."""
    return tuple(b for b in (profile.buckets(SEQ) if profile is not None else ()) if b <= max_seq)


@dataclass
class TargetGraphs:
    """What one target's engine runs: per mode the graph as built and after the passes, the pass
    reports, the prefill buckets and the entries of a compiled module (`entries`: prefill,
    decode and `prefill_<bucket>` per bucket)."""

    built: dict[str, HIR]  # by mode (PREFILL, DECODE)
    graphs: dict[str, HIR]
    reports: dict[str, PassReport]
    buckets: tuple[int, ...] = ()
    bucketed: BucketedGraphs | None = None
    backend: BackendOptions = field(default_factory=BackendOptions)
    passes: str | None = None  # the pipeline text asked for (None: the profile's)

    @property
    def entries(self) -> dict[str, HIR]:
        variants = {entry(b): g for b, g in self.bucketed.variants.items()} if self.bucketed else {}
        return {**self.graphs, **variants}


def target_graphs(ckpt: Checkpoint, *, target: str | None = None, profile: Profile | None = None,
                  passes: str | None = None, flow: GemmaFlow | None = None,
                  bounds: Mapping[str, int] | None = None, max_seq: int | None = None) -> TargetGraphs:
    """The graphs for `target` (a preset name, whose `[backend.<target>]` options apply; None for
    the reference interpreter). `max_seq` (default: the model's context) limits the buckets."""
    backend = profile.backend_for(target) if profile is not None and target else BackendOptions()
    if passes is None:
        passes = backend.passes
    base = (flow or GemmaFlow(ckpt.config, ckpt.weights)).batch(1).last_token_logits().export_kv()
    if profile is not None:
        base = profile.apply(base)
    built: dict[str, HIR] = {}
    graphs: dict[str, HIR] = {}
    reports: dict[str, PassReport] = {}
    for mode, make in MODE_FLOWS.items():
        hir = make(base).build_hir()
        if bounds:
            record_bounds(hir, {k: v for k, v in bounds.items() if k in graph_symbols(hir)})
        built[mode] = hir
        graphs[mode], reports[mode] = run_pipeline(hir, mode, profile, passes, ckpt.config)
    if PAST_SEQ not in graph_symbols(graphs[DECODE]):
        # a decode with one fixed past length would write and read the KV cache at that offset on
        # every step: wrong (NaN) logits from the second token on, not an error
        pipeline = ",".join(r.spec for r in reports[DECODE].records)
        raise PassError(f"the pass pipeline binds PAST_SEQ ({pipeline}): the decode graph must take every past "
                        "length, one step per generated token",
                        hint="bind only the prompt length (specialize{SEQ=N}), or give prompt-length buckets: "
                             "[specialize] SEQ = [32, 128] in the profile")
    buckets = profile_buckets(profile, max_seq or ckpt.config.max_position_embeddings)
    bucketed = specialize_buckets(graphs[PREFILL], SEQ, buckets) if buckets else None
    return TargetGraphs(built, graphs, reports, buckets, bucketed, backend, passes)


def reference_graphs(ckpt: Checkpoint, flow: GemmaFlow | None = None, *, passes: str | None = None,
                     profile: Profile | None = None) -> tuple[HIR, HIR]:
    """(prefill, decode) graphs of the reference target; see `target_graphs`."""
    graphs = target_graphs(ckpt, profile=profile, passes=passes, flow=flow).graphs
    return graphs[PREFILL], graphs[DECODE]


DEFAULT_STEP_BUCKETS = (1, 2, 4, 8)
"""Static step entries (SEQ = SEQS = b) next to the dynamic `step`. Static rows <= 16 get the GEMV
schedules (`weight_kernels.GEMV_ROWS`; the rows in register tiles inside the block loop, so each
weight block is read and decoded once per step: docs/kernels.md), the dynamic step the GEMM.
Re-measured with that GEMV (`bench/paged_buckets.py`, load average 8.5, so ~2x the times below):
step_4 97.5 ms vs `step` 131.2; step_8 134.9 vs 173.2; step_16 197.4 vs 248.4. 16 is not a default
bucket for its compile time: a tiny gemma3 paged compile took 16 s with (1, 2), 34 s with
(1, 2, 4, 8, 16). Before that GEMV (one row per pass over the weights), measured on the real
gemma-3-270m (gguf, 2 shared cores, `bench/paged_buckets.py`: min of 5
interleaved decode steps at 32 past positions): 1 sequence 33.1 ms in `step_1` vs 60.9 in `step`
(the single engine's decode: 33.4); 2 sequences 41.9 vs 61.6; 4 sequences 63.6 vs 63.5 (a 4-row
GEMV is no faster than the GEMM); 8 sequences 81.7 vs 82.6. So buckets 1 and 2 then; each is one
more function to compile (~+20% of an artifact's build time each on tiny models)."""


@dataclass
class PagedGraphs:
    """The paged step graph of a target (`GemmaFlow.paged`) as built and after the passes, and
    its static bucket variants (`step_<b>`: SEQ and SEQS bound to b)."""

    built: HIR
    graph: HIR
    report: PassReport
    variants: dict[int, HIR] = field(default_factory=dict)

    @property
    def entries(self) -> dict[str, HIR]:
        return {STEP: self.graph, **{step_entry(b): g for b, g in sorted(self.variants.items())}}


def paged_graphs(ckpt: Checkpoint, *, target: str | None = None, profile: Profile | None = None,
                 passes: str | None = None, flow: GemmaFlow | None = None, page_size: int = DEFAULT_PAGE_SIZE,
                 max_seq: int | None = None, buckets: tuple[int, ...] = DEFAULT_STEP_BUCKETS) -> PagedGraphs:
    """The step graph with the prefill pipeline of `target_graphs` (same profile, passes,
    `[[layers]]`), for sequences of up to `max_seq` positions (default: the model's context)."""
    backend = profile.backend_for(target) if profile is not None and target else BackendOptions()
    if passes is None:
        passes = backend.passes
    base = flow or GemmaFlow(ckpt.config, ckpt.weights)
    if profile is not None:
        base = profile.apply(base)
    built = base.paged(page_size, max_seq).build_hir()
    graph, report = run_pipeline(built, PREFILL, profile, passes, ckpt.config)
    variants = {b: bind(graph, {SEQ: b, SEQS: b})[0] for b in buckets}
    return PagedGraphs(built, graph, report, variants)
