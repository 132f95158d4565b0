"""verify(): one test per rule, each on a graph broken in exactly that way."""

from __future__ import annotations

import pytest

from rlx.errors import HIRError
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.tensor_type import TensorType
from rlx.hir.verify import RULES, verify

from .graphs import f32, tiny_block


def _base() -> tuple[HIR, str]:
    h = HIR()
    x = h.input("x", f32(2, 4))
    y = h.add(Op.GELU_TANH, [x])
    h.set_output("y", y)
    return h, x


def test_valid_graph_passes_every_rule() -> None:
    assert set(RULES) == {"acyclic", "outputs", "unique-names", "nodes", "quantized"}
    verify(tiny_block())


def test_rule_acyclic() -> None:
    h, x = _base()
    h.insert_raw(Node("a", Op.ADD, (x, "b"), f32(2, 4)))
    h.insert_raw(Node("b", Op.ADD, (x, "a"), f32(2, 4)))
    with pytest.raises(HIRError, match="acyclic"):
        verify(h)


def test_rule_outputs_missing() -> None:
    h = HIR()
    h.input("x", f32(2))
    with pytest.raises(HIRError, match="no outputs"):
        verify(h)


def test_rule_outputs_dangling() -> None:
    h, _ = _base()
    h.raw_set_output("z", "nowhere")
    with pytest.raises(HIRError, match="undefined %nowhere"):
        verify(h)


def test_rule_unique_names() -> None:
    h, _ = _base()
    h.insert_raw(Node("x2", Op.INPUT, (), f32(2), (("name", "x"),)))
    with pytest.raises(HIRError, match="unique-names"):
        verify(h)


def test_rule_arity() -> None:
    h, x = _base()
    h.insert_raw(Node("bad", Op.ADD, (x,), f32(2, 4)))
    with pytest.raises(HIRError, match="arity"):
        verify(h)


def test_rule_attrs_missing_and_unknown() -> None:
    h, x = _base()
    h.insert_raw(Node("s", Op.SCALE, (x,), f32(2, 4)))
    with pytest.raises(HIRError, match="attrs.*missing required attr 'value'"):
        verify(h)
    h2, x2 = _base()
    h2.insert_raw(Node("g", Op.GELU_TANH, (x2,), f32(2, 4), (("fast", True),)))
    with pytest.raises(HIRError, match="attrs.*unknown attr"):
        verify(h2)


def test_rule_attrs_must_be_complete() -> None:
    h, x = _base()
    h.insert_raw(Node("n", Op.RMSNORM, (x,), f32(2, 4), (("eps", 1e-6),)))  # offset default not written
    with pytest.raises(HIRError, match="does not carry every attr"):
        verify(h)


def test_rule_types_declared_wrong() -> None:
    h, x = _base()
    h.insert_raw(Node("g", Op.GELU_TANH, (x,), f32(2, 5)))
    with pytest.raises(HIRError, match="types.*declared f32\\[2, 5\\]"):
        verify(h)


def test_rule_types_shape_disagreement() -> None:
    h, x = _base()
    w = h.param("w", f32(3, 5))
    h.insert_raw(Node("l", Op.LINEAR, (x, w), f32(2, 3)))
    with pytest.raises(HIRError, match="in-features mismatch"):
        verify(h)


def test_rule_types_dtype() -> None:
    h, x = _base()
    table = h.param("t", f32(8, 4))
    h.insert_raw(Node("e", Op.EMBED, (table, x), f32(2, 4, 4)))
    with pytest.raises(HIRError, match="ids must be integer"):
        verify(h)


def test_rule_const_value_count() -> None:
    h, _ = _base()
    h.insert_raw(Node("c", Op.CONST, (), TensorType(DType.F32, (3,)), (("value", (1.0, 2.0)),)))
    with pytest.raises(HIRError, match="holds 2 values"):
        verify(h)


def test_rule_defined_inputs() -> None:
    h, _ = _base()
    h.insert_raw(Node("g2", Op.GELU_TANH, (), f32(2, 4)))
    object.__setattr__(h.node("g2"), "inputs", ("ghost",))
    with pytest.raises(HIRError, match="undefined %ghost"):
        verify(h)


def test_rule_quantized() -> None:
    """A quantized weight feeds only the inputs that read blocks (a linear's weight), and is never
    an output."""
    h = HIR("q")
    x = h.input("x", f32(2, 64))
    w = h.param("w", TensorType(DType.F32, (8, 64), "q8_0"))
    h.set_output("y", h.add(Op.LINEAR, [x, w]))
    verify(h)
    bad = h.copy()
    bad.insert_raw(Node("s", Op.SCALE, (w,), TensorType(DType.F32, (8, 64), "q8_0"), (("value", 2.0),)))
    bad.raw_set_output("s", "s")
    with pytest.raises(HIRError, match="quantized: %s .* reads quantized"):
        verify(bad)
    out = h.copy()
    out.raw_set_output("w", w)
    with pytest.raises(HIRError, match="quantized: output w"):
        verify(out)


def test_rule_quantized_checks_the_input_position() -> None:
    """Reading blocks is a property of an op's input, not of the op: a linear reads a quantized
    weight, never a quantized activation; an embedding reads a quantized table, and a concat
    whole rows of one format (fused projections)."""
    h = HIR("q")
    ids = h.input("ids", TensorType(DType.I64, (1, 3)))
    table = h.param("table", TensorType(DType.F32, (16, 64), "q4_0"))
    wa = h.param("wa", TensorType(DType.F32, (8, 64), "q4_0"))
    wb = h.param("wb", TensorType(DType.F32, (4, 64), "q4_0"))
    e = h.add(Op.EMBED, [table, ids])
    h.set_output("y", h.add(Op.LINEAR, [e, h.add(Op.CONCAT, [wa, wb], {"axis": 0})]))
    verify(h)
    bad = h.copy()
    bad.insert_raw(Node("w", Op.PARAM, (), f32(5, 64), (("name", "w"), ("scale", 1.0), ("shift", 0.0))))
    bad.insert_raw(Node("z", Op.LINEAR, (wa, "w"), f32(8, 5), ()))  # well typed: [8, 64] x [5, 64]^T
    bad.raw_set_output("z", "z")
    with pytest.raises(HIRError, match="quantized: %z .* reads quantized %p.wa as input 0"):
        verify(bad)
