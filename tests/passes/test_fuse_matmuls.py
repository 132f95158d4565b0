from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.passes.fuse_matmuls import FuseGateUp, FuseQKV

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %wq = param() {"name": "l.q_proj.weight", "scale": 1.0, "shift": 0.0} : f32[8, 4]
  %wk = param() {"name": "l.k_proj.weight", "scale": 1.0, "shift": 0.0} : f32[2, 4]
  %wv = param() {"name": "l.v_proj.weight", "scale": 1.0, "shift": 0.0} : f32[2, 4]
  %v = linear(%x, %wv) : f32[SEQ, 2] meta {"layer": 0, "role": "v"}
  %q = linear(%x, %wq) : f32[SEQ, 8] meta {"layer": 0, "role": "q"}
  %k = linear(%x, %wk) : f32[SEQ, 2] meta {"layer": 0, "role": "k"}
  return q=%q, k=%k, v=%v
}
"""

AFTER = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %wq = param() {"name": "l.q_proj.weight", "scale": 1.0, "shift": 0.0} : f32[8, 4]
  %wk = param() {"name": "l.k_proj.weight", "scale": 1.0, "shift": 0.0} : f32[2, 4]
  %wv = param() {"name": "l.v_proj.weight", "scale": 1.0, "shift": 0.0} : f32[2, 4]
  %q.qkv.w = concat(%wq, %wk, %wv) {"axis": 0} : f32[12, 4]
  %q.qkv = linear(%x, %q.qkv.w) : f32[SEQ, 12] meta {"layer": 0}
  %q.part = slice(%q.qkv) {"axis": -1, "start": 0, "stop": 8} : f32[SEQ, 8] meta {"layer": 0, "role": "q"}
  %k.part = slice(%q.qkv) {"axis": -1, "start": 8, "stop": 10} : f32[SEQ, 2] meta {"layer": 0, "role": "k"}
  %v.part = slice(%q.qkv) {"axis": -1, "start": 10, "stop": 12} : f32[SEQ, 2] meta {"layer": 0, "role": "v"}
  return q=%q.part, k=%k.part, v=%v.part
}
"""


def test_golden_qkv_in_role_order() -> None:
    assert_golden(FuseQKV(), BEFORE, AFTER)


def test_numbers_and_gate_up_leaves_qkv_alone() -> None:
    before = hir(BEFORE)
    result = FuseQKV().run(before)
    assert result.stats == {"hits.qkv": 1, "misses.qkv": 0}
    assert_same_numbers(before, result.hir, env={"SEQ": 3})
    assert not FuseGateUp().run(before).changed


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["gate", "up", "down"]), min_size=1, max_size=3, unique=True),
       st.integers(1, 3))
def test_property_gate_up_groups(roles: list[str], groups: int) -> None:
    """Modules share one input (the worst case): each fuses only its own gate and up."""
    h = HIR("mlp")
    x = h.input("x", TensorType(DType.F32, (sym(SEQ), 4)))
    for g in range(groups):
        for r in roles:
            w = h.param(f"layers.{g}.mlp.{r}_proj.weight", TensorType(DType.F32, (3 + len(r) % 3, 4)))
            h.set_output(f"{g}.{r}", h.add(Op.LINEAR, [x, w], meta={"layer": g, "role": r}))
    result = FuseGateUp().run(h)
    fusable = len({"gate", "up"} & set(roles)) == 2
    assert result.stats["hits.gate-up"] == (groups if fusable else 0)
    assert_same_numbers(h, result.hir, env={"SEQ": 2})
