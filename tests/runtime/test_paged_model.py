"""The reference `PagedModel` (the paged step graph under the interpreter) against the existing
single-sequence reference engine: several sequences at different positions in one step (one
prefilling a chunk while others decode, one joining late), sliding-window layers past their
window (tiny models: window 4, pages of 4, prompts of 10), the Gemma 2 softcap model, Gemma 4
MoE and KV sharing. Tolerance: both sides are the same interpreter in float32 over the same
weights; only the attention's key count per row and summation grouping differ, so rtol 1e-5 with
a floor of 1e-5 x max|logit| (measured ~1e-6); greedy tokens must be equal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rlx
from rlx.compiler.engines import paged_reference_engine, reference_engine
from rlx.compiler.graphs import paged_graphs
from rlx.errors import FlowError, RunError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.hir import conventions as cv
from rlx.hir.ops import Op
from rlx.passes import DEFAULT_PIPELINE
from rlx.runtime.paged_engine import PagedReferenceEngine
from rlx.runtime.paged_model import StepBatch
from rlx.runtime.reference import ReferenceEngine
from tests.runtime.paged_walk import PROMPTS, batched_rows, single_sequence_rows, walk
from tests.targets.walks import assert_close

Ckpt = Callable[[str], Path]
FAMILIES = ["gemma3", "gemma2", "gemma4-moe", "gemma4-kvshare", "gemma1-gqa"]
PAGE = 4
NUM_PAGES = 16
SHUFFLED = [11, 3, 14, 0, 7, 9, 2, 13, 5, 1, 15, 8]  # 3 sequences x 4 pages, no two adjacent


@pytest.fixture(scope="module")
def engines(tiny_ckpt: Ckpt) -> Callable[[str], tuple[ReferenceEngine, Callable[[], PagedReferenceEngine]]]:
    """`engines(family)`: the single-sequence reference engine and a maker of fresh paged engines
    sharing its weights (graphs built once per family)."""
    made: dict[str, tuple[ReferenceEngine, Callable[[], PagedReferenceEngine]]] = {}

    def get(family: str) -> tuple[ReferenceEngine, Callable[[], PagedReferenceEngine]]:
        if family not in made:
            ckpt = open_checkpoint(tiny_ckpt(family))
            single = reference_engine(ckpt, passes=DEFAULT_PIPELINE)
            paged = paged_reference_engine(ckpt, num_pages=NUM_PAGES, page_size=PAGE, passes=DEFAULT_PIPELINE,
                                           shared=single)
            made[family] = single, lambda p=paged: PagedReferenceEngine(
                p.step_graph, single.weights, num_pages=NUM_PAGES, vocab_size=p.vocab_size, quantized=single.quantized)
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_logits_equal_single_sequence(family: str, engines: Callable) -> None:
    single, make = engines(family)
    streams = walk(make(), SHUFFLED)
    for s in streams:
        want = single_sequence_rows(single, s)
        assert_close(batched_rows(s), want)
        last = len(s.prompt) - 1
        greedy = [int(np.argmax(r)) for p, r in zip((p for p, _ in s.rows), want, strict=True) if p >= last]
        assert s.generated == greedy[:len(s.generated)]  # greedy tokens equal the single engine's
    assert max(p for s in streams for p, _ in s.rows) >= 2 * PAGE + 4  # past the window, over several pages


def test_chunked_prefill_equals_one_prefill(engines: Callable) -> None:
    """A prompt fed 3 + 3 + 4 tokens over three steps, then decoded: every row equals the single
    engine's (its last-chunk row equals one prefill of the whole prompt)."""
    single, make = engines("gemma3")
    (stream,) = walk(make(), range(NUM_PAGES), prompts=[PROMPTS[0]],
                     schedule=[[(0, 3)], [(0, 3)], [(0, 4)], [(0, 1)], [(0, 1)]])
    want = single_sequence_rows(single, stream)
    assert [p for p, _ in stream.rows] == [2, 5, 9, 10, 11]
    assert_close(batched_rows(stream), want)
    assert_close(stream.rows[2][1], single.prefill(PROMPTS[0]))


def test_shuffled_pages_give_the_same_logits(engines: Callable) -> None:
    _, make = engines("gemma4-kvshare")
    contiguous = walk(make(), range(12))
    shuffled = walk(make(), SHUFFLED)
    for a, b in zip(contiguous, shuffled, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(batched_rows(a), batched_rows(b), rtol=1e-6, atol=1e-6)


def test_pool_holds_each_position_in_its_page(engines: Callable) -> None:
    """K of position p of a sequence sits in page_table[p // PAGE], slot p % PAGE; no other page
    of the pool is touched."""
    _, make = engines("gemma3")
    model = make()
    (stream,) = walk(model, SHUFFLED, prompts=[PROMPTS[0]], schedule=[[(0, 10)]])
    pool = model.pool(0, "k")
    used = set(stream.pages[:3])
    for page in range(NUM_PAGES):
        written = np.abs(pool[page]).sum(axis=(0, 2)) > 0  # per slot
        expected = [(stream.pages.index(page) * PAGE + s) < 10 if page in used else False for s in range(PAGE)]
        assert list(written) == expected, page


def _batch(**changes: object) -> StepBatch:
    base = dict(tokens=[2, 5], positions=[0, 1], token_seq=[0, 0], page_table=[[3]], logit_rows=[1])
    base.update(changes)
    return StepBatch(*(np.asarray(base[k], np.int32) for k in ("tokens", "positions", "token_seq", "page_table",
                                                                 "logit_rows")))


@pytest.mark.parametrize(("changes", "message"), [
    ({"page_table": [[NUM_PAGES]]}, "page id 16"),
    ({"page_table": [[-1]]}, "page id -1"),
    ({"positions": [0, PAGE]}, "past its page table of 1 pages"),
    ({"positions": [0, 10_000]}, "position 10000"),
    ({"tokens": [2, 256]}, "token id 256"),
    ({"token_seq": [0, 1]}, "token_seq 1"),
    ({"logit_rows": [2]}, "logit_rows 2"),
    ({"positions": [0]}, "StepBatch.positions has shape"),
])
def test_bad_batches_are_refused_by_name(engines: Callable, changes: dict, message: str) -> None:
    _, make = engines("gemma3")
    with pytest.raises(RunError, match=message):
        make().forward(_batch(**changes))


@pytest.mark.parametrize(("change", "name"), [
    (lambda f: f.custom_mask(), "custom_mask"),
    (lambda f: f.media_attn_bias(), "media_attn_bias"),
    (lambda f: f.prefill_from_hidden(), "prefill_from_hidden"),
])
def test_paged_flow_refuses_what_it_cannot_express(tiny_ckpt: Ckpt, change: Callable, name: str) -> None:
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    with pytest.raises(FlowError, match=name):
        change(GemmaFlow(ckpt.config, ckpt.weights)).paged(PAGE).build_hir()


def test_step_graph_interface(tiny_ckpt: Ckpt) -> None:
    """Inputs and outputs of the step graph, and its pools recorded for engines and the lowering
    (KV-shared Gemma 4 layers have no pools of their own)."""
    ckpt = open_checkpoint(tiny_ckpt("gemma4-kvshare"))
    hir = GemmaFlow(ckpt.config, ckpt.weights).paged(PAGE, max_seq=64).build_hir()
    layout = cv.paged_layout(hir)
    assert layout is not None and (layout.page_size, layout.max_pages) == (PAGE, 16)
    assert {(p.layer, p.kind) for p in layout.pools} == {(0, "k"), (0, "v"), (1, "k"), (1, "v")}
    assert str(hir.node(hir.outputs[cv.LOGITS]).type) == "f32[1, SEQS, 256]"
    assert str(hir.inputs["k_pages.1"].type) == "f32[PAGES, 1, 4, 32]"  # the full layer's own head dim / KV heads
    assert set(hir.outputs) == {cv.LOGITS, *(p.output for p in layout.pools)}
    assert not cv.kv_slots(hir)


def test_f16_profile_keeps_the_pools_in_the_compute_dtype(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """Under `[precision] compute = "f16"` the pools are f16 inputs written as they are (a cast of
    a pool would write into a copy, not into the engine's pool), and the batched logits equal the
    single engine's within f16 rounding (its own prefill and decode differ by ~7e-4 of max|logit|)."""
    (tmp_path / "gemma.rlx.toml").write_text('[precision]\ncompute = "f16"\n')
    model = rlx.load(tiny_ckpt("gemma3"), "reference", profile=tmp_path / "gemma.rlx.toml")
    paged = model.paged_model(num_pages=NUM_PAGES, page_size=PAGE)
    step = paged.step_graph  # type: ignore[attr-defined]
    layout = cv.paged_layout(step)
    assert layout is not None
    for pool in layout.pools:
        assert step.inputs[pool.input].type.dtype.value == "f16"
        assert all(u.op is Op.PAGED_KV_WRITE for u in step.users(step.inputs[pool.input].id))
    for s in walk(paged, SHUFFLED):
        assert_close(batched_rows(s), single_sequence_rows(model.engine, s), rtol=3e-3)


def test_default_pipeline_fuses_the_step_graph(tiny_ckpt: Ckpt) -> None:
    """The default pass pipeline runs on the step graph: the fusions that apply fire, attention's
    (already one op) just misses, nothing is left half-fused."""
    graphs = paged_graphs(open_checkpoint(tiny_ckpt("gemma4-moe")), passes=DEFAULT_PIPELINE, page_size=PAGE)
    stats = {p["name"]: p["stats"] for p in graphs.report.to_dict()["passes"]}
    for name, hit in (("fuse-qkv", "hits.qkv"), ("fuse-gate-up", "hits.gate-up"), ("fuse-geglu", "hits.geglu"),
                      ("fuse-add-norm", "hits.add-norm"), ("fold-rope", "rope-table")):
        assert stats[name].get(hit, 0) > 0, (name, stats[name])
    assert not any(p["misses"] for p in graphs.report.to_dict()["passes"])
    assert graphs.graph.op_counts()["paged_attention"] == 4
