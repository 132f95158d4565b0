"""fold-rope: `rope(x, pos, const inv_freq)` -> `rope_table(x, pos, const cos|sin table)`.

Tolerance: under the interpreter the fold is exact (`interpreter.rope_cos_sin_table` runs the very float32
operations `rope` runs), so numbers are compared bit for bit. The table itself is within 2^-23
(<= 1 float32 ulp of values in [-1, 1]) of transformers' own float32 cos / sin; compiled code is
held to test_cpu.py's rtol 1e-5 (with a floor of 1e-5 x max|value|) against the interpreter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.errors import HIRError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.conventions import KVSlot, record_kv
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter, rope_cos_sin_table
from rlx.hir.ops import Op
from rlx.hir.pass_infra import parse_pipeline
from rlx.hir.pass_manager import PassManager
from rlx.hir.serialize import dumps, loads
from rlx.hir.shapes import PAST_SEQ, SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.hir.text import parse_hir, print_hir
from rlx.hir.verify import verify
from rlx.passes import DEFAULT_PIPELINE
from rlx.passes.cse import CommonSubexpressionElimination
from rlx.passes.fold_rope import FoldRope, position_count
from rlx.passes.specialize import record_bounds

from .harness import assert_golden, hir

INV = (1.0, 0.5)
BEFORE = """
hir m {"bounds": {"PAST_SEQ": 2}, "kv": [{"layer": 0, "kind": "k", "past": "past_k.0", "present": "present_k.0"}]} {
  %q = input() {"name": "q"} : f32[1, 2, 1, 4]
  %k = input() {"name": "k"} : f32[1, 1, 1, 4]
  %positions = input() {"name": "positions"} : i64[1, 1]
  %past_k.0 = input() {"name": "past_k.0"} : f32[1, 1, PAST_SEQ, 4]
  %inv = const() {"value": [1.0, 0.5]} : f32[2]
  %q.rope = rope(%q, %positions, %inv) : f32[1, 2, 1, 4]
  %k.rope = rope(%k, %positions, %inv) : f32[1, 1, 1, 4]
  %kv = concat(%past_k.0, %k.rope) {"axis": 2} : f32[1, 1, PAST_SEQ+1, 4]
  return q=%q.rope, present_k.0=%kv
}
"""

# the table holds P = PAST_SEQ + 1 = 3 rows; its values come from rope_cos_sin_table (their bits are
# numpy's float32 cos / sin, checked on their own below), everything else is spelled out
AFTER = """
hir m {"bounds": {"PAST_SEQ": 2}, "kv": [{"layer": 0, "kind": "k", "past": "past_k.0", "present": "present_k.0"}]} {
  %q = input() {"name": "q"} : f32[1, 2, 1, 4]
  %k = input() {"name": "k"} : f32[1, 1, 1, 4]
  %positions = input() {"name": "positions"} : i64[1, 1]
  %past_k.0 = input() {"name": "past_k.0"} : f32[1, 1, PAST_SEQ, 4]
  %inv.table = const() {"value": TABLE} : f32[3, 4]
  %q.rope.folded = rope_table(%q, %positions, %inv.table) : f32[1, 2, 1, 4]
  %k.rope.folded = rope_table(%k, %positions, %inv.table) : f32[1, 1, 1, 4]
  %kv = concat(%past_k.0, %k.rope.folded) {"axis": 2} : f32[1, 1, PAST_SEQ+1, 4]
  return q=%q.rope.folded, present_k.0=%kv
}
""".replace("TABLE", json.dumps(rope_cos_sin_table(np.asarray(INV, np.float32), 3).reshape(-1).tolist()))


def f32(*shape: object) -> TensorType:
    return TensorType(DType.F32, tuple(shape))  # type: ignore[arg-type]


def _rope_graph(head_dim: int, thetas: tuple[float, ...], *, seq: int | None, past: int | None | bool,
                batch: int = 1, bounds: dict[str, int] | None = None) -> HIR:
    """q and k ropes per theta (a layer per theta, as a Gemma graph has), K concatenated to a past
    when `past` is not False (None: symbolic PAST_SEQ)."""
    h = HIR("ropes")
    s = seq if seq is not None else sym(SEQ)
    pos = h.input("positions", TensorType(DType.I64, (batch, s)))
    for i, theta in enumerate(thetas):
        inv = tuple(float(v) for v in (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32))
        table = h.add(Op.CONST, attrs={"value": inv}, type=f32(head_dim // 2), name=f"rope.inv_freq.{i}")
        q = h.add(Op.ROPE, [h.input(f"q.{i}", f32(batch, 2, s, head_dim)), pos, table], name=f"l{i}.q.rope")
        k = h.add(Op.ROPE, [h.input(f"k.{i}", f32(batch, 1, s, head_dim)), pos, table], name=f"l{i}.k.rope")
        if past is not False:
            p = past if past is not None else sym(PAST_SEQ)
            k = h.add(Op.CONCAT, [h.input(f"past_k.{i}", f32(batch, 1, p, head_dim)), k], {"axis": 2})
        h.set_output(f"q.{i}", q)
        h.set_output(f"k.{i}", k)
    if past is not False:
        record_kv(h, [KVSlot(i, "k", f"past_k.{i}", f"k.{i}") for i in range(len(thetas))])
    if bounds:
        record_bounds(h, bounds)
    return verify(h)


def _feeds(h: HIR, env: dict[str, int], positions: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {"positions": positions}
    for name, node in h.inputs.items():
        if name != "positions":
            shape = [d if isinstance(d, int) else env[str(d)] for d in node.type.shape]
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_exact(before: HIR, after: HIR, feeds: dict[str, np.ndarray]) -> None:
    a, b = Interpreter(before).run(feeds), Interpreter(after).run(feeds)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_golden() -> None:
    assert_golden(FoldRope(), BEFORE, AFTER)


def test_stats_and_round_trip() -> None:
    result = FoldRope().run(hir(BEFORE))
    assert result.changed
    assert result.stats == {"rope-table": 2, "tables": 1, "skipped.no-position-bound": 0, "skipped.too-large": 0}
    assert parse_hir(print_hir(result.hir)) == result.hir == loads(dumps(result.hir))  # text and JSON
    assert not result.hir.nodes_of(Op.ROPE) and len(result.hir.nodes_of(Op.CONST)) == 1


def test_table_is_transformers_cos_sin() -> None:
    """The exact formula of transformers' Gemma 3 rotary embedding (float32 pos * inv_freq, then
    float32 cos / sin, cat(freqs, freqs)) at every position of a 4096-row table."""
    inv = (1.0 / 10_000.0 ** (np.arange(0, 256, 2) / 256)).astype(np.float32)
    table = rope_cos_sin_table(inv, 4096)
    freqs = torch.arange(4096)[None, :, None].float() * torch.from_numpy(inv)
    emb = torch.cat((freqs, freqs), dim=-1)[0]
    np.testing.assert_allclose(table[:, :128], emb.cos().numpy()[:, :128], rtol=0, atol=2**-23)
    np.testing.assert_allclose(table[:, 128:], emb.sin().numpy()[:, 128:], rtol=0, atol=2**-23)


@pytest.mark.parametrize(("seq", "past", "bounds", "count"), [
    (5, False, None, 5),                        # static prefill: T = SEQ
    (1, 7, None, 8),                            # static decode: T = PAST + 1
    (None, False, {"SEQ": 16}, 16),             # symbolic prefill, bounded
    (1, None, {"PAST_SEQ": 31}, 32),            # symbolic decode, bounded
    (None, None, {"SEQ": 8, "PAST_SEQ": 8}, 16),  # chunked prefill: both bounded
])
def test_position_count(seq: int | None, past: int | None | bool, bounds: dict[str, int] | None, count: int) -> None:
    h = _rope_graph(4, (10_000.0,), seq=seq, past=past, bounds=bounds)
    assert position_count(h, h.inputs["positions"].id) == count
    out = FoldRope().run(h).hir
    assert [n.type.shape for n in out.nodes_of(Op.CONST)] == [(count, 4)]


@pytest.mark.parametrize(("seq", "past", "bounds"), [
    (None, False, None),              # symbolic SEQ, no bound recorded
    (1, None, None),                  # symbolic PAST_SEQ, no bound recorded
    (None, None, {"SEQ": 8}),         # a bound on SEQ alone does not bound PAST_SEQ+SEQ
])
def test_missing_bound_leaves_rope_and_counts_it(seq: int | None, past: int | None | bool,
                                                 bounds: dict[str, int] | None) -> None:
    h = _rope_graph(4, (10_000.0, 1e6), seq=seq, past=past, bounds=bounds)
    result = FoldRope().run(h)
    assert not result.changed and result.hir == h
    assert result.stats["skipped.no-position-bound"] == 4 and result.stats["rope-table"] == 0
    assert result.misses == ()  # a precondition, not a half-matched pattern: assert_clean accepts it


def test_too_large_table_is_not_built() -> None:
    h = _rope_graph(8, (10_000.0,), seq=16, past=False)  # 16 x 8 = 128 values
    assert FoldRope(max_elements=127).run(h).stats["skipped.too-large"] == 2
    assert FoldRope(max_elements=128).run(h).stats["rope-table"] == 2
    assert str(parse_pipeline("fold-rope{max_elements=128}")[0]) == "fold-rope{max_elements=128}"


def test_one_table_per_distinct_inv_freq() -> None:
    """Equal inv_freq values share one table even from distinct const nodes; CSE then has nothing
    left to merge. Distinct values get their own."""
    h = _rope_graph(4, (10_000.0, 10_000.0, 1e6), seq=3, past=False)
    result = FoldRope().run(h)
    assert result.stats["tables"] == 2 and len(result.hir.nodes_of(Op.CONST)) == 2
    assert CommonSubexpressionElimination().run(result.hir).stats == {"merged": 0}
    _assert_exact(h, result.hir, _feeds(h, {}, np.asarray([[0, 1, 2]]), np.random.default_rng(0)))


def test_positions_outside_the_table_are_an_error() -> None:
    h = _rope_graph(4, (10_000.0,), seq=3, past=False)
    out = FoldRope().run(h).hir
    with pytest.raises(HIRError, match=r"positions 1\.\.3 are outside the table's 0\.\.2"):
        Interpreter(out).run(_feeds(h, {}, np.asarray([[1, 2, 3]]), np.random.default_rng(0)))


def test_type_rule() -> None:
    h = HIR()
    x = h.input("x", f32(1, 2, 3, 4))
    pos = h.input("positions", TensorType(DType.I64, (1, 3)))
    ok = h.add(Op.CONST, attrs={"value": (0.0,) * 20}, type=f32(5, 4))
    assert h.node(h.add(Op.ROPE_TABLE, [x, pos, ok])).type == f32(1, 2, 3, 4)
    narrow = h.add(Op.CONST, attrs={"value": (0.0,) * 10}, type=f32(5, 2))
    with pytest.raises(HIRError, match="must be float \\[positions, head_dim = 4\\]"):
        h.add(Op.ROPE_TABLE, [x, pos, narrow])
    with pytest.raises(HIRError, match="positions must be int"):
        h.add(Op.ROPE_TABLE, [x, x, ok])


@settings(max_examples=25, deadline=None)
@given(half=st.integers(1, 8), theta=st.sampled_from([10_000.0, 1e6, 50.0]), batch=st.integers(1, 2),
       shape=st.sampled_from(["prefill", "decode", "bounded-prefill", "bounded-decode"]),
       size=st.integers(1, 12), data=st.data())
def test_property_fold_is_exact(half: int, theta: float, batch: int, shape: str, size: int,
                                data: st.DataObject) -> None:
    """Any head dim, batch and bound: every rope folds, and outputs are bit-identical at random
    positions that include both ends of the table (bounded graphs run at a drawn size <= bound)."""
    run = data.draw(st.integers(1, size)) if shape == "bounded-prefill" else size
    past_run = data.draw(st.integers(0, size)) if shape == "bounded-decode" else size
    graphs: dict[str, tuple[dict[str, object], int, dict[str, int]]] = {  # graph, run seq, run env
        "prefill": (dict(seq=size, past=False), size, {}),
        "decode": (dict(seq=1, past=size), 1, {}),
        "bounded-prefill": (dict(seq=None, past=False, bounds={SEQ: size}), run, {SEQ: run}),
        "bounded-decode": (dict(seq=1, past=None, bounds={PAST_SEQ: size}), 1, {PAST_SEQ: past_run}),
    }
    spec, seq, env = graphs[shape]
    h = _rope_graph(2 * half, (theta,), batch=batch, **spec)  # type: ignore[arg-type]
    count = position_count(h, h.inputs["positions"].id)
    assert count == size + (1 if "decode" in shape else 0)
    result = FoldRope().run(h)
    assert result.stats["rope-table"] == 2 and result.stats["tables"] == 1
    positions = np.asarray(data.draw(st.lists(st.integers(0, count - 1), min_size=batch * seq,
                                              max_size=batch * seq)), np.int64).reshape(batch, seq)
    positions.flat[0], positions.flat[-1] = 0, count - 1
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    _assert_exact(h, result.hir, _feeds(h, env, positions, rng))


# ---- a tiny Gemma 3: sliding (theta 1e4) and full (theta 1e6) layers ----

NO_FOLD = DEFAULT_PIPELINE.replace("fold-rope,", "")
PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]


def _run_pipeline(h: HIR, text: str) -> tuple[HIR, dict[str, int]]:
    out, report = PassManager(parse_pipeline(text), assert_clean=True).run(h)
    return out, {k: v for r in report.records for k, v in r.stats.items()}


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_gemma3_both_tables_fold_and_logits_are_unchanged(mode: str, tiny_ckpt: Callable[[str], Path]) -> None:
    from tests.fixtures.tiny import decoder_of, load_hf

    d = tiny_ckpt("gemma3")
    ckpt = open_checkpoint(d)
    cfg = ckpt.config
    flow = GemmaFlow(ckpt.config, ckpt.weights.shape).export_kv()
    n = len(PROMPT)
    graph = (flow.prefill(n) if mode == "prefill" else flow.decode(n)).build()
    folded, stats = _run_pipeline(graph, DEFAULT_PIPELINE)
    plain, _ = _run_pipeline(graph, NO_FOLD)
    assert stats["rope-table"] == 2 * cfg.num_layers and stats["tables"] == 2
    assert folded.op_counts()["rope_table"] == 2 * cfg.num_layers and "rope" not in folded.op_counts()
    count = n + (1 if mode == "decode" else 0)
    tables = {n.id: n for n in folded.nodes_of(Op.CONST) if n.id.endswith(".table")}
    assert [t.type.shape[0] for t in tables.values()] == [count, count]

    # the tables are transformers' cos / sin for each layer type, at every position
    rotary = decoder_of(load_hf(d)).rotary_emb
    positions = torch.arange(count)[None]
    for layer_type in ("sliding_attention", "full_attention"):
        cos, sin = (t[0].numpy() for t in rotary(torch.zeros(1), positions, layer_type))
        half = cos.shape[-1] // 2
        matches = [t for t in tables.values()
                   if np.abs(np.asarray(t.attr("value"), np.float32).reshape(count, -1)[:, :half] - cos[:, :half]).max()
                   <= 2**-23]
        assert len(matches) == 1, layer_type
        table = np.asarray(matches[0].attr("value"), np.float32).reshape(count, -1)
        np.testing.assert_allclose(table[:, half:], sin[:, :half], rtol=0, atol=2**-23)

    if mode == "prefill":
        feeds = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(n)[None]}
    else:
        rng = np.random.default_rng(0)
        feeds = {"input_ids": np.asarray([[5]]), "positions": np.asarray([[n]])}
        feeds |= {name: rng.standard_normal([int(x) for x in node.type.shape]).astype(np.float32)  # type: ignore[arg-type]
                  for name, node in graph.inputs.items() if name.startswith("past_")}
    weights = WeightCache(ckpt.weights)  # one float32 copy for both runs
    ref = Interpreter(plain, weights).run(feeds)
    out = Interpreter(folded, weights).run(feeds)
    for name in ref:
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)
