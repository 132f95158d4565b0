"""Every HIR op is declared once (`rlx.hir.ops.OPS`: arity, attrs, type rule, precision class) and
implemented in each layer that runs it: the numpy interpreter (`IMPLS`) and the TVM lowering
(`LOWERINGS`). Leaves and `result` are handled by the interpreter and the lowering themselves."""

from __future__ import annotations

from rlx.hir.interpreter import IMPLS
from rlx.hir.ops import OPS, Op, Precision
from rlx.targets.lowerings import LOWERINGS

STRUCTURAL = {Op.INPUT, Op.PARAM, Op.CONST, Op.RESULT}  # no kernel: a value the runner provides or picks


def test_every_op_is_declared_once_with_a_precision_class() -> None:
    assert set(OPS) == set(Op)
    assert {op for op, spec in OPS.items() if spec.precision is Precision.LEAF} == {Op.INPUT, Op.PARAM, Op.CONST}


def test_every_op_has_an_interpreter_implementation_and_a_lowering() -> None:
    computed = set(Op) - STRUCTURAL
    assert set(IMPLS) == computed, f"missing: {computed - set(IMPLS)}, extra: {set(IMPLS) - computed}"
    assert set(LOWERINGS) == computed, f"missing: {computed - set(LOWERINGS)}, extra: {set(LOWERINGS) - computed}"
