from __future__ import annotations

from hypothesis import given, settings

from rlx.hir.graph import HIR
from rlx.passes.cse import CommonSubexpressionElimination
from tests.hir.graphs import random_graphs

from .harness import assert_golden, assert_same_numbers, hir

BEFORE = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, 4]
  %a = gelu_tanh(%x) : f32[BATCH, 4]
  %b = gelu_tanh(%x) : f32[BATCH, 4]
  %c = scale(%a) {"value": 2.0} : f32[BATCH, 4]
  %d = scale(%b) {"value": 2.0} : f32[BATCH, 4]
  %e = scale(%b) {"value": 3.0} : f32[BATCH, 4]
  %s = add(%c, %d) : f32[BATCH, 4]
  %t = add(%s, %e) : f32[BATCH, 4]
  return t=%t
}
"""

AFTER = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, 4]
  %a = gelu_tanh(%x) : f32[BATCH, 4]
  %c = scale(%a) {"value": 2.0} : f32[BATCH, 4]
  %e = scale(%a) {"value": 3.0} : f32[BATCH, 4]
  %s = add(%c, %c) : f32[BATCH, 4]
  %t = add(%s, %e) : f32[BATCH, 4]
  return t=%t
}
"""


def test_golden() -> None:
    assert_golden(CommonSubexpressionElimination(), BEFORE, AFTER)


def test_stats_and_numbers() -> None:
    before = hir(BEFORE)
    result = CommonSubexpressionElimination().run(before)
    assert result.stats == {"merged": 2}
    assert_same_numbers(before, result.hir)


@settings(max_examples=40, deadline=None)
@given(random_graphs())
def test_property_no_duplicates_left(h: HIR) -> None:
    out = CommonSubexpressionElimination().run(h).hir
    keys = [(n.op, n.inputs, n.attrs) for n in out.nodes()]
    assert len(keys) == len(set(keys))
    assert_same_numbers(h, out)
