from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.passes.fuse_add_norm import FuseAddNorm

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %h = input() {"name": "h"} : f32[SEQ, 4]
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[4]
  %r = add(%h, %x) : f32[SEQ, 4]
  %n = rms_norm(%r, %w) {"eps": 1e-06, "offset": 1.0} : f32[SEQ, 4]
  %g = gelu_tanh(%n) : f32[SEQ, 4]
  %out = add(%r, %g) : f32[SEQ, 4]
  return out=%out
}
"""

AFTER = """
hir m {
  %h = input() {"name": "h"} : f32[SEQ, 4]
  %x = input() {"name": "x"} : f32[SEQ, 4]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[4]
  %n.fused = add_rms_norm(%h, %x, %w) {"eps": 1e-06, "offset": 1.0} : f32[SEQ, 4]
  %g = gelu_tanh(%n.fused) : f32[SEQ, 4]
  %r.sum = result(%n.fused) {"index": 1} : f32[SEQ, 4]
  %out = add(%r.sum, %g) : f32[SEQ, 4]
  return out=%out
}
"""


def test_golden() -> None:
    assert_golden(FuseAddNorm(), BEFORE, AFTER)


def test_numbers_and_stats() -> None:
    before = hir(BEFORE)
    result = FuseAddNorm().run(before)
    assert result.stats == {"hits.add-norm": 1, "misses.add-norm": 0}
    assert_same_numbers(before, result.hir, env={"SEQ": 3})


def test_broadcasting_add_is_a_miss() -> None:
    text = BEFORE.replace('%x = input() {"name": "x"} : f32[SEQ, 4]', '%x = input() {"name": "x"} : f32[4]')
    result = FuseAddNorm().run(hir(text))
    assert [m.node for m in result.misses] == ["n"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=5))
def test_property_residual_chains(layers: list[tuple[bool, bool]]) -> None:
    """A residual stream of adds, each optionally followed by a norm, sum reused or not."""
    h = HIR("chain")
    t = TensorType(DType.F32, (sym(SEQ), 4))
    r = h.input("h", t)
    outs = []
    for i, (weighted, reuse) in enumerate(layers):
        r = h.add(Op.ADD, [r, h.input(f"x{i}", t)])
        ws = [h.param(f"w{i}", TensorType(DType.F32, (4,)))] if weighted else []
        n = h.add(Op.RMSNORM, [r, *ws], {"eps": 1e-6, "offset": 1.0 if weighted else 0.0})
        outs.append(n)
        if not reuse:
            r = n
    h.set_output("r", r)
    for i, n in enumerate(outs):
        h.set_output(f"n{i}", n)
    result = FuseAddNorm().run(h)
    assert result.stats["hits.add-norm"] == len(layers) and not result.hir.nodes_of(Op.RMSNORM)
    assert_same_numbers(h, result.hir, env={"SEQ": 3})
