from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.tensor_type import TensorType
from rlx.passes.fold_constants import FoldConstants

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %ids = input() {"name": "ids"} : i64[BATCH, SEQ]
  %table = param() {"name": "embed", "scale": 1.0, "shift": 0.0} : f32[16, 4]
  %nw = param() {"name": "norm", "scale": 1.0, "shift": 0.0} : f32[4]
  %c = const() {"value": [1.0, 2.0, 3.0, 4.0]} : f32[4]
  %c2 = scale(%c) {"value": 0.5} : f32[4]
  %e = embed(%table, %ids) : f32[BATCH, SEQ, 4]
  %h = scale(%e) {"value": 8.0} : f32[BATCH, SEQ, 4]
  %n = rms_norm(%h, %nw) {"eps": 1e-06, "offset": 1.0} : f32[BATCH, SEQ, 4]
  %y = add(%n, %c2) : f32[BATCH, SEQ, 4]
  return y=%y
}
"""

AFTER = """
hir m {
  %ids = input() {"name": "ids"} : i64[BATCH, SEQ]
  %c2.const = const() {"value": [0.5, 1.0, 1.5, 2.0]} : f32[4]
  %p.embed.derived = param() {"name": "embed", "scale": 8.0, "shift": 0.0} : f32[16, 4]
  %e.folded = embed(%p.embed.derived, %ids) : f32[BATCH, SEQ, 4]
  %p.norm.derived = param() {"name": "norm", "scale": 1.0, "shift": 1.0} : f32[4]
  %n.folded = rms_norm(%e.folded, %p.norm.derived) {"eps": 1e-06, "offset": 0.0} : f32[BATCH, SEQ, 4]
  %y = add(%n.folded, %c2.const) : f32[BATCH, SEQ, 4]
  return y=%y
}
"""


def test_golden() -> None:
    assert_golden(FoldConstants(), BEFORE, AFTER)


def test_numbers_and_stats() -> None:
    before = hir(BEFORE)
    result = FoldConstants().run(before)
    assert result.stats == {"const-ops": 1, "embed-scale": 1, "norm-offset": 1}
    assert_same_numbers(before, result.hir)


def test_tied_table_is_not_copied() -> None:
    """With a tied LM head reading the table, the embedding scale stays a runtime op."""
    text = BEFORE.replace("return y=%y", "%head = linear(%y, %table) : f32[BATCH, SEQ, 16]\n  return y=%head")
    result = FoldConstants().run(hir(text))
    assert result.stats["embed-scale"] == 0
    assert result.hir.nodes_of(Op.SCALE)
    assert_same_numbers(hir(text), result.hir)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-4, 4, width=32), min_size=2, max_size=6), st.floats(0.25, 4.0),
       st.sampled_from([0.0, 1.0]))
def test_property_norm_and_scale_folding_keeps_numbers(vals: list[float], s: float, offset: float) -> None:
    h = HIR()
    x = h.input("x", TensorType(DType.F32, (3, len(vals))))
    c = h.add(Op.CONST, attrs={"value": tuple(vals)}, type=TensorType(DType.F32, (len(vals),)))
    w = h.param("w", TensorType(DType.F32, (len(vals),)))
    n = h.add(Op.RMSNORM, [h.add(Op.ADD, [x, h.add(Op.SCALE, [c], {"value": s})]), w],
              {"eps": 1e-6, "offset": offset})
    h.set_output("y", n)
    out = FoldConstants().run(h).hir
    assert not out.nodes_of(Op.SCALE)
    assert all(node.attr("offset") == 0.0 for node in out.nodes_of(Op.RMSNORM))
    assert_same_numbers(h, out, env={}, rtol=1e-5, atol=1e-5)
