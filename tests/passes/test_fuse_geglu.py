from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.passes.fuse_geglu import FuseGeGLU
from rlx.passes.fuse_matmuls import FuseGateUp

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %wg = param() {"name": "mlp.gate_proj.weight", "scale": 1.0, "shift": 0.0} : f32[6, 4]
  %wu = param() {"name": "mlp.up_proj.weight", "scale": 1.0, "shift": 0.0} : f32[6, 4]
  %g = linear(%x, %wg) : f32[SEQ, 6]
  %u = linear(%x, %wu) : f32[SEQ, 6]
  %a = gelu_tanh(%g) : f32[SEQ, 6]
  %m = mul(%u, %a) : f32[SEQ, 6]
  return m=%m
}
"""

AFTER = """
hir m {
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %wg = param() {"name": "mlp.gate_proj.weight", "scale": 1.0, "shift": 0.0} : f32[6, 4]
  %wu = param() {"name": "mlp.up_proj.weight", "scale": 1.0, "shift": 0.0} : f32[6, 4]
  %g = linear(%x, %wg) : f32[SEQ, 6]
  %u = linear(%x, %wu) : f32[SEQ, 6]
  %m.geglu = geglu(%g, %u) : f32[SEQ, 6]
  return m=%m.geglu
}
"""


def test_golden_two_inputs() -> None:
    assert_golden(FuseGeGLU(), BEFORE, AFTER)


def test_after_gate_up_it_reads_the_packed_matmul() -> None:
    before = hir(BEFORE)
    packed = FuseGateUp().run(before).hir
    result = FuseGeGLU().run(packed)
    geglu = result.hir.nodes_of(Op.GEGLU)
    assert len(geglu) == 1 and result.hir.node(geglu[0].inputs[0]).op is Op.LINEAR
    assert not result.hir.nodes_of(Op.SLICE) and not result.misses
    assert_same_numbers(before, result.hir, env={"SEQ": 3})


def test_lonely_gelu_is_a_miss() -> None:
    h = hir(BEFORE.replace("return m=%m", "return m=%m, a=%a"))
    result = FuseGeGLU().run(h)
    assert [m.node for m in result.misses] == ["a"]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.booleans(), st.booleans())
def test_property_mlps(n: int, pack: bool, swap: bool) -> None:
    h = HIR("mlps")
    x = h.input("x", TensorType(DType.F32, (sym(SEQ), 4)))
    for i in range(n):
        g = h.add(Op.LINEAR, [x, h.param(f"{i}.gate_proj.weight", TensorType(DType.F32, (5, 4)))])
        u = h.add(Op.LINEAR, [x, h.param(f"{i}.up_proj.weight", TensorType(DType.F32, (5, 4)))])
        a = h.add(Op.GELU_TANH, [g])
        h.set_output(f"m{i}", h.add(Op.MUL, [u, a] if swap else [a, u]))
    start = FuseGateUp().run(h).hir if pack else h
    result = FuseGeGLU().run(start)
    assert result.stats["hits.geglu"] == n and not result.misses
    assert_same_numbers(h, result.hir, env={"SEQ": 2})
