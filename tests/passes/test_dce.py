from __future__ import annotations

from hypothesis import given, settings

from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.passes.dce import DeadCodeElimination
from tests.hir.graphs import random_graphs

from .harness import assert_golden, assert_same_numbers

BEFORE = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, 4]
  %unused = input() {"name": "unused"} : f32[4]
  %w = param() {"name": "w", "scale": 1.0, "shift": 0.0} : f32[4, 4]
  %dead = linear(%x, %w) : f32[BATCH, 4]
  %dead2 = gelu_tanh(%dead) : f32[BATCH, 4]
  %y = gelu_tanh(%x) : f32[BATCH, 4]
  return y=%y
}
"""

AFTER = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, 4]
  %unused = input() {"name": "unused"} : f32[4]
  %y = gelu_tanh(%x) : f32[BATCH, 4]
  return y=%y
}
"""


def test_golden() -> None:
    assert_golden(DeadCodeElimination(), BEFORE, AFTER)


def test_reports_removed_count_and_keeps_numbers() -> None:
    from .harness import hir

    before = hir(BEFORE)
    result = DeadCodeElimination().run(before)
    assert result.changed and result.stats == {"removed": 3}
    assert len(before) == 6  # the input graph is not mutated
    assert_same_numbers(before, result.hir)
    again = DeadCodeElimination().run(result.hir)
    assert not again.changed


@settings(max_examples=40, deadline=None)
@given(random_graphs())
def test_property_only_dead_nodes_go(h: HIR) -> None:
    result = DeadCodeElimination().run(h)
    live_ops = {n.id for n in result.hir.nodes()}
    assert set(h.outputs.values()) <= live_ops
    assert {n.id for n in h.nodes_of(Op.INPUT)} <= live_ops
    for n in result.hir.nodes():  # every surviving non-input node feeds an output
        assert n.op is Op.INPUT or result.hir.users(n.id) or n.id in result.hir.outputs.values()
    assert_same_numbers(h, result.hir)
