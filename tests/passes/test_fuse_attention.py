from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import BATCH, SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.passes.fuse_attention import FuseAttention

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %pos = input() {"name": "positions"} : i64[BATCH, SEQ]
  %q = input() {"name": "q"} : f32[BATCH, 4, SEQ, 8]
  %k = input() {"name": "k"} : f32[BATCH, 2, SEQ, 8]
  %v = input() {"name": "v"} : f32[BATCH, 2, SEQ, 8]
  %krep = repeat_kv(%k) {"repeats": 2} : f32[BATCH, 4, SEQ, 8]
  %vrep = repeat_kv(%v) {"repeats": 2} : f32[BATCH, 4, SEQ, 8]
  %kt = transpose(%krep) {"perm": [0, 1, 3, 2]} : f32[BATCH, 4, 8, SEQ]
  %s = matmul(%q, %kt) : f32[BATCH, 4, SEQ, SEQ]
  %s1 = scale(%s) {"value": 0.25} : f32[BATCH, 4, SEQ, SEQ]
  %s2 = softcap(%s1) {"cap": 50.0} : f32[BATCH, 4, SEQ, SEQ]
  %s3 = causal_mask(%s2, %pos) {"bidirectional": false, "window": 3} : f32[BATCH, 4, SEQ, SEQ]
  %p = softmax(%s3) : f32[BATCH, 4, SEQ, SEQ]
  %o = matmul(%p, %vrep) : f32[BATCH, 4, SEQ, 8]
  return o=%o
}
"""

AFTER = """
hir m {
  %pos = input() {"name": "positions"} : i64[BATCH, SEQ]
  %q = input() {"name": "q"} : f32[BATCH, 4, SEQ, 8]
  %k = input() {"name": "k"} : f32[BATCH, 2, SEQ, 8]
  %v = input() {"name": "v"} : f32[BATCH, 2, SEQ, 8]
  %o.fused = attention(%q, %k, %v, %pos) {"mask": "causal", "scale": 0.25, "softcap": 50.0, "window": 3} : f32[BATCH, 4, SEQ, 8]
  return o=%o.fused
}
"""


def test_golden() -> None:
    assert_golden(FuseAttention(), BEFORE, AFTER)


def test_numbers_hits_and_no_misses() -> None:
    before = hir(BEFORE)
    result = FuseAttention().run(before)
    assert result.stats == {"hits.attention": 1, "misses.attention": 0}
    assert_same_numbers(before, result.hir)


def test_a_stray_softmax_is_a_miss() -> None:
    h = hir(BEFORE.replace("return o=%o", "%extra = softmax(%q) : f32[BATCH, 4, SEQ, 8]\n  return o=%o, e=%extra"))
    result = FuseAttention().run(h)
    assert [m.node for m in result.misses] == ["extra"]


def _attention_graph(heads: int, kv: int, scale: float | None, softcap: float | None, window: int,
                     mask: str, media: bool) -> HIR:
    h = HIR("attn")
    B, S = sym(BATCH), sym(SEQ)
    f32 = lambda *s: TensorType(DType.F32, s)  # noqa: E731
    pos = h.input("positions", TensorType(DType.I64, (B, S)))
    q = h.input("q", f32(B, heads, S, 4))
    k = h.input("k", f32(B, kv, S, 4))
    v = h.input("v", f32(B, kv, S, 4))
    if heads != kv:
        k = h.add(Op.REPEAT_KV, [k], {"repeats": heads // kv})
        v = h.add(Op.REPEAT_KV, [v], {"repeats": heads // kv})
    s = h.add(Op.MATMUL, [q, h.add(Op.TRANSPOSE, [k], {"perm": (0, 1, 3, 2)})])
    if scale is not None:
        s = h.add(Op.SCALE, [s], {"value": scale})
    if softcap is not None:
        s = h.add(Op.SOFTCAP, [s], {"cap": softcap})
    if mask == "custom":
        s = h.add(Op.ADD, [s, h.input("attn_mask", f32(B, 1, S, S))])
    else:
        s = h.add(Op.CAUSAL_MASK, [s, pos], {"window": window, "bidirectional": mask == "bidirectional"})
    if media:
        s = h.add(Op.ADD, [s, h.input("media_attn_bias", f32(B, 1, S, S))])
    h.set_output("o", h.add(Op.MATMUL, [h.add(Op.SOFTMAX, [s]), v]))
    return h


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.one_of(st.none(), st.floats(0.05, 2.0)),
       st.one_of(st.none(), st.floats(1.0, 60.0)), st.integers(0, 4),
       st.sampled_from(["causal", "bidirectional", "custom"]), st.booleans())
def test_property_every_variant_fuses_with_same_numbers(heads_kv: tuple[int, int], scale: float | None,
                                                        softcap: float | None, window: int, mask: str,
                                                        media: bool) -> None:
    before = _attention_graph(*heads_kv, scale, softcap, window, mask, media)
    result = FuseAttention().run(before)
    assert result.stats["hits.attention"] == 1 and not result.misses
    assert result.hir.op_counts() .get("softmax", 0) == 0
    assert_same_numbers(before, result.hir, env={"BATCH": 2, "SEQ": 6})
