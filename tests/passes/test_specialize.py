"""specialize{SEQ=...}, bucketed variants and the Dispatcher that runs them as the dynamic graph."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.errors import RunError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op, attr_dim
from rlx.hir.pass_infra import PassError, format_pipeline, parse_pipeline
from rlx.hir.pass_manager import PassManager
from rlx.hir.shapes import dim_symbols
from rlx.hir.text import parse_hir, print_hir
from rlx.hir.verify import verify
from rlx.passes import DEFAULT_PIPELINE
from rlx.passes.specialize import (
    SELECT_INPUT,
    BucketedGraphs,
    Specialize,
    graph_symbols,
    specialize_buckets,
    upper_bounds,
)
from rlx.runtime.dispatch import Dispatcher
from tests.hir.graphs import random_graphs, tiny_block

from .harness import assert_golden, assert_same_numbers, hir, random_weights

BEFORE = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, SEQ, 8]
  %past = input() {"name": "past"} : f32[BATCH, PAST_SEQ, 8]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[8, 8]
  %y = linear(%x, %w) : f32[BATCH, SEQ, 8]
  %r = reshape(%y) {"shape": ["BATCH", "SEQ", 2, 4]} : f32[BATCH, SEQ, 2, 4]
  %m = reshape(%r) {"shape": ["BATCH", "SEQ", 8]} : f32[BATCH, SEQ, 8]
  %c = concat(%past, %m) {"axis": 1} : f32[BATCH, PAST_SEQ+SEQ, 8]
  %last = slice(%c) {"axis": 1, "start": -1, "stop": null} : f32[BATCH, 1, 8]
  return c=%c, last=%last
}
"""

AFTER = """
hir m {"bounds": {"SEQ": 16}} {
  %x = input() {"name": "x"} : f32[BATCH, 16, 8]
  %past = input() {"name": "past"} : f32[BATCH, PAST_SEQ, 8]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[8, 8]
  %y = linear(%x, %w) : f32[BATCH, 16, 8]
  %r = reshape(%y) {"shape": ["BATCH", 16, 2, 4]} : f32[BATCH, 16, 2, 4]
  %m = reshape(%r) {"shape": ["BATCH", 16, 8]} : f32[BATCH, 16, 8]
  %c = concat(%past, %m) {"axis": 1} : f32[BATCH, PAST_SEQ+16, 8]
  %last = slice(%c) {"axis": 1, "start": -1, "stop": null} : f32[BATCH, 1, 8]
  return c=%c, last=%last
}
"""


def _symbols_anywhere(h: HIR) -> frozenset[str]:
    """Symbols in types and in reshape attrs (the pass must leave no trace of a bound one)."""
    out = graph_symbols(h)
    for n in h.nodes_of(Op.RESHAPE):
        out |= dim_symbols(attr_dim(d) for d in n.attr("shape"))
    return out


def test_golden() -> None:
    assert_golden(Specialize(dims={"SEQ": 16}), BEFORE, AFTER)


def test_binds_every_symbol_and_keeps_numbers() -> None:
    before = hir(BEFORE)
    result = Specialize(dims={"BATCH": "2", "PAST_SEQ": 3, "SEQ": "16"}).run(before)
    verify(result.hir)
    assert result.changed and result.stats == {"retyped": 7}  # every node but the static param
    assert _symbols_anywhere(result.hir) == frozenset()
    assert upper_bounds(result.hir) == {"BATCH": 2, "PAST_SEQ": 3, "SEQ": 16}
    assert graph_symbols(before) == {"BATCH", "PAST_SEQ", "SEQ"}  # the input graph is not mutated
    assert_same_numbers(before, result.hir, env={"BATCH": 2, "SEQ": 16, "PAST_SEQ": 3})


def test_result_round_trips_with_its_bounds() -> None:
    out = Specialize(dims={"SEQ": 16}).run(hir(BEFORE)).hir
    assert parse_hir(print_hir(out)) == out
    assert upper_bounds(parse_hir(print_hir(out))) == {"SEQ": 16}


STATIC = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, 1, 8]
  %y = gelu_tanh(%x) : f32[BATCH, 1, 8]
  return y=%y
}
"""


def test_symbols_the_graph_lacks_are_ignored() -> None:
    static = hir(STATIC)  # e.g. a decode step: SEQ is 1 already
    result = Specialize(dims={"SEQ": 128}).run(static)
    assert not result.changed and result.stats == {"retyped": 0}
    assert result.hir == static and upper_bounds(result.hir) == {}


def test_sizes_the_graph_cannot_hold_name_the_node() -> None:
    g = """
    hir m {
      %x = input() {"name": "x"} : f32[SEQ, 4]
      %s = slice(%x) {"axis": 0, "start": 0, "stop": 8} : f32[8, 4]
      return s=%s
    }
    """
    with pytest.raises(PassError, match=r"specialize\{SEQ=4\}.*%s.*past dim 4"):
        Specialize(dims={"SEQ": 4}).run(hir(g))


def test_pipeline_text_parses_prints_and_runs(tmp_path: Path) -> None:
    passes = parse_pipeline("specialize{SEQ=128},dce")
    assert passes[0] == Specialize(dims={"SEQ": 128}) == Specialize(dims=(("SEQ", "128"),))
    assert format_pipeline(passes) == "specialize{SEQ=128},dce"
    assert parse_pipeline(format_pipeline(passes)) == passes
    assert str(parse_pipeline("specialize{SEQ=8, BATCH=1}")[0]) == "specialize{BATCH=1,SEQ=8}"
    out, report = PassManager(passes, dump_dir=tmp_path).run(verify(tiny_block()))
    assert report.records[0].stats["retyped"] > 0
    assert "SEQ" not in graph_symbols(out) and upper_bounds(out) == {"SEQ": 128}
    assert (tmp_path / "01-specialize.hir").read_text().startswith('hir tiny {"bounds": {"SEQ": 128}} {')


@pytest.mark.parametrize("text, message", [
    ("specialize{SEQ=0}", "SEQ='0' is not a positive integer"),
    ("specialize{SEQ=-3}", "is not a positive integer"),
    ("specialize{SEQ=1.5}", "is not a positive integer"),
    ("specialize{SEQ=abc}", "is not a positive integer"),
    ("specialize{LEN=4}", "unknown symbol 'LEN'"),
    ("specialize", "needs a binding"),
    ("specialize{dims=SEQ}", "SYMBOL=size pairs"),
])
def test_bad_bindings(text: str, message: str) -> None:
    with pytest.raises(PassError, match=message):
        parse_pipeline(text)


def test_bad_python_bindings() -> None:
    with pytest.raises(PassError, match="not a positive integer"):
        Specialize(dims={"SEQ": True})
    with pytest.raises(PassError, match="bound twice"):
        Specialize(dims=(("SEQ", 2), ("SEQ", 3)))


@settings(max_examples=30, deadline=None)
@given(random_graphs(), st.dictionaries(st.sampled_from(["BATCH", "SEQ"]), st.integers(1, 6), min_size=1))
def test_property_specialized_runs_like_dynamic(h: HIR, binding: dict[str, int]) -> None:
    result = Specialize(dims=binding).run(h)
    verify(result.hir)
    assert not _symbols_anywhere(result.hir) & binding.keys()
    assert_same_numbers(h, result.hir, env={"BATCH": 2, "SEQ": 5, **binding})


# ---- buckets and the dispatcher ----


class _Recording:
    """A runner that keeps the feeds each variant got (to see the padding)."""

    def __init__(self, h: HIR, weights: Mapping[str, np.ndarray]) -> None:
        self.inner = Interpreter(h, weights)
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append(dict(feeds))
        return self.inner.run(feeds)


def _same(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_allclose(b[k], a[k], rtol=tol, atol=tol * max(1.0, float(np.abs(a[k]).max())), err_msg=k)


def test_buckets_pad_at_the_end_and_pick_the_last_real_token() -> None:
    h = verify(tiny_block())  # ends in a last-token slice
    graphs = specialize_buckets(h, buckets=(8, 2, 2))
    assert graphs.buckets == (2, 8) and graphs.select_input == SELECT_INPUT
    for b, v in graphs.variants.items():
        verify(v)
        assert "SEQ" not in _symbols_anywhere(v) and upper_bounds(v) == {"SEQ": 8}
        assert not [n for n in v.nodes_of(Op.SLICE) if n.attr("start") == -1]
        assert str(v.inputs[SELECT_INPUT].type) == f"f32[BATCH, 1, {b}]"
    weights = random_weights(h, np.random.default_rng(0))
    runners = {b: _Recording(v, weights) for b, v in graphs.variants.items()}
    dispatcher = Dispatcher(graphs, lambda v: runners[int(v.inputs["input_ids"].type.shape[1])])  # type: ignore[arg-type]
    ids = np.array([[3, 4, 5], [6, 7, 1]])
    pos = np.array([[0, 1, 2], [0, 1, 2]])
    out = dispatcher.run({"input_ids": ids, "positions": pos})
    _same(Interpreter(h, weights).run({"input_ids": ids, "positions": pos}), out)
    fed = runners[8].feeds[0]
    assert fed["input_ids"].tolist() == [[3, 4, 5, 0, 0, 0, 0, 0], [6, 7, 1, 0, 0, 0, 0, 0]]
    assert fed["positions"].tolist() == [list(range(8))] * 2
    assert fed[SELECT_INPUT][:, 0].tolist() == [[0, 0, 1, 0, 0, 0, 0, 0]] * 2
    assert dispatcher.bucket_for(2) == 2 and dispatcher.bucket_for(3) == 8


def test_dispatcher_errors_name_length_and_buckets() -> None:
    h = verify(tiny_block())
    dispatcher = Dispatcher(specialize_buckets(h, buckets=(1, 4, 8, 16)), lambda v: Interpreter(v, {}))
    with pytest.raises(RunError, match=r"17 tokens is longer than the largest bucket 16 \(buckets: 1, 4, 8, 16\)"):
        dispatcher.run({"input_ids": np.zeros((1, 17), np.int64), "positions": np.arange(17)[None]})
    with pytest.raises(RunError, match="no SEQ positions"):
        dispatcher.run({"input_ids": np.zeros((1, 0), np.int64), "positions": np.zeros((1, 0), np.int64)})
    with pytest.raises(RunError, match="input positions"):
        dispatcher.run({"input_ids": np.zeros((1, 3), np.int64), "positions": np.arange(4)[None]})
    with pytest.raises(RunError, match="positions reach 6, but keys end at 2"):  # pads would sit at 3..7
        dispatcher.run({"input_ids": np.zeros((1, 3), np.int64), "positions": np.arange(4, 7)[None]})


@pytest.mark.parametrize("change, message", [
    (lambda t: t, "only SEQ is bucketed"),
    (lambda t: t.replace("SEQ", "5"), "has no SEQ dim"),
    (lambda t: t.replace('"x"', '"attn_mask"'), "'attn_mask' may let real tokens attend to pads"),
    (lambda t: t.replace('"bidirectional": false', '"bidirectional": true'), "%mk attends bidirectionally"),
])
def test_buckets_refuse_what_padding_would_change(change: Callable[[str], str], message: str) -> None:
    g = """
    hir m {
      %x = input() {"name": "x"} : f32[1, 2, SEQ, SEQ]
      %pos = input() {"name": "positions"} : i64[1, SEQ]
      %mk = causal_mask(%x, %pos) {"bidirectional": false, "window": 0} : f32[1, 2, SEQ, SEQ]
      return y=%mk
    }
    """
    dim = "PAST_SEQ" if message.startswith("only") else "SEQ"
    with pytest.raises(PassError, match=message):
        specialize_buckets(hir(change(g)), dim=dim, buckets=(4,))


@settings(max_examples=25, deadline=None)
@given(random_graphs(), st.lists(st.integers(1, 9), min_size=1, max_size=3), st.data())
def test_property_dispatch_equals_dynamic(h: HIR, buckets: list[int], data: st.DataObject) -> None:
    graphs = specialize_buckets(h, buckets=buckets)
    n = data.draw(st.integers(1, max(buckets)))
    rng = np.random.default_rng(n)
    weights = random_weights(h, rng)
    feeds = {k: rng.standard_normal((2, n, 4)).astype(np.float32) for k in h.inputs}
    _same(Interpreter(h, weights).run(feeds), Dispatcher(graphs, lambda v: Interpreter(v, weights)).run(feeds))


# ---- real model recipe on tiny checkpoints ----


def _dispatch_vs_dynamic(ckpt_dir: Path, flow: Callable[[GemmaFlow], GemmaFlow], lengths: tuple[int, ...],
                         pipeline: str = "") -> None:
    """Bucketed variants (of the graph after `pipeline`) through the Dispatcher vs the dynamic graph."""
    ckpt = open_checkpoint(ckpt_dir)
    dynamic = flow(GemmaFlow(ckpt.config, ckpt.weights.shape).prefill().dynamic_seq()).export_kv().build()
    weights = WeightCache(ckpt.weights)
    compiled, _ = PassManager(parse_pipeline(pipeline)).run(dynamic)
    graphs: BucketedGraphs = specialize_buckets(compiled, buckets=(1, 4, 8, 16))
    dispatcher = Dispatcher(graphs, lambda v: Interpreter(v, weights))
    reference = Interpreter(dynamic, weights)
    rng = np.random.default_rng(0)
    for n in lengths:
        feeds = {"input_ids": rng.integers(3, ckpt.config.vocab_size, (1, n)), "positions": np.arange(n)[None]}
        _same(reference.run(feeds), dispatcher.run(feeds))


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_gemma_last_token_logits_and_kv_match_dynamic(tiny_ckpt: Callable[[str], Path], family: str) -> None:
    _dispatch_vs_dynamic(tiny_ckpt(family), GemmaFlow.last_token_logits, (3, 5, 7, 11, 13))


def test_gemma_all_position_logits_match_dynamic(tiny_ckpt: Callable[[str], Path]) -> None:
    _dispatch_vs_dynamic(tiny_ckpt("gemma3"), GemmaFlow.lm_head, (5, 11))


def test_gemma_fused_graph_buckets_like_dynamic(tiny_ckpt: Callable[[str], Path]) -> None:
    """The order a compiled target uses: fuse first, then specialize per bucket."""
    _dispatch_vs_dynamic(tiny_ckpt("gemma3"), GemmaFlow.last_token_logits, (3, 11), DEFAULT_PIPELINE)
