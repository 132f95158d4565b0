"""HIR core: shapes, text / JSON round-trips, DOT, graph editing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from rlx.errors import HIRError
from rlx.hir import serialize
from rlx.hir.dot import to_dot
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import PAST_SEQ, SEQ, add_dims, bind_shape, eval_dim, parse_dim, sym
from rlx.hir.text import parse_hir, print_hir
from rlx.hir.verify import verify

from .graphs import f32, random_graphs, tiny_block


def test_symbolic_dims_add_and_parse() -> None:
    total = add_dims(sym(PAST_SEQ), sym(SEQ))
    assert str(total) == "PAST_SEQ+SEQ"
    assert parse_dim("PAST_SEQ+SEQ") == total
    assert parse_dim("SEQ+PAST_SEQ") == total
    assert add_dims(sym(SEQ), 3, -3) == sym(SEQ)
    assert eval_dim(total, {"PAST_SEQ": 5, "SEQ": 2}) == 7
    assert add_dims(2, 3) == 5


def test_bind_shape_rejects_conflicts() -> None:
    env: dict[str, int] = {}
    bind_shape((sym(SEQ), 4), (3, 4), env, "x")
    assert env == {"SEQ": 3}
    with pytest.raises(ValueError, match="SEQ=5 conflicts"):
        bind_shape((sym(SEQ),), (5,), env, "y")
    with pytest.raises(ValueError, match="expected"):
        bind_shape((sym(SEQ), 4), (3, 5), env, "z")


def test_text_round_trip_is_exact() -> None:
    h = verify(tiny_block())
    text = print_hir(h)
    back = parse_hir(text)
    assert back == h
    assert print_hir(back) == text
    verify(back)


def test_text_round_trip_keeps_float_bits() -> None:
    h = HIR()
    x = h.input("x", f32(2))
    y = h.add(Op.SCALE, [x], {"value": 0.1 + 0.2})
    h.set_output("y", y)
    back = parse_hir(print_hir(h))
    assert back.node(y).attr("value") == 0.1 + 0.2


def test_json_round_trip_is_exact_with_meta() -> None:
    h = tiny_block()
    first = h.nodes()[3]
    first.meta["origin"] = "layer 0"
    back = serialize.loads(serialize.dumps(h))
    assert back == h
    assert back.node(first.id).meta == {"origin": "layer 0"}
    assert serialize.dumps(back) == serialize.dumps(h)


def test_json_rejects_other_documents() -> None:
    with pytest.raises(HIRError, match="not an rlx-hir"):
        serialize.loads(json.dumps({"format": "onnx"}))


@settings(max_examples=40, deadline=None)
@given(random_graphs())
def test_round_trips_on_random_graphs(h: HIR) -> None:
    verify(h)
    assert parse_hir(print_hir(h)) == h
    assert serialize.loads(serialize.dumps(h)) == h


def test_parse_errors_name_the_line() -> None:
    with pytest.raises(HIRError, match="line 2"):
        parse_hir("hir m {\n  %x = nosuchop() : f32[2]\n  return y=%x\n}\n")
    with pytest.raises(HIRError, match="used before it is defined"):
        parse_hir("hir m {\n  %y = gelu_tanh(%x) : f32[2]\n  return y=%y\n}\n")
    with pytest.raises(HIRError, match="expected 'hir NAME"):
        parse_hir("graph {}")


def test_dot_lists_every_node_and_output() -> None:
    h = tiny_block()
    dot = to_dot(h)
    assert dot.startswith('digraph "tiny"')
    for n in h.nodes():
        assert f'"{n.id}" [label=' in dot
    assert '"out:hidden"' in dot


def test_replace_uses_and_remove() -> None:
    h = HIR()
    x = h.input("x", f32(4))
    a = h.add(Op.GELU_TANH, [x])
    b = h.add(Op.ADD, [a, a])
    h.set_output("b", b)
    c = h.add(Op.SCALE, [x], {"value": 2.0})
    h.replace_uses(a, c)
    assert h.node(b).inputs == (c, c)
    with pytest.raises(HIRError, match="still used"):
        h.remove(c)
    h.remove(a)
    assert a not in h
    verify(h)


def test_add_infers_types_and_rejects_bad_inputs() -> None:
    h = HIR()
    x = h.input("x", f32(sym(SEQ), 4))
    y = h.add(Op.LINEAR, [x, h.param("w", f32(6, 4))])
    assert str(h.node(y).type) == "f32[SEQ, 6]"
    with pytest.raises(HIRError, match="in-features mismatch"):
        h.add(Op.LINEAR, [x, h.param("w2", f32(6, 5))])
    with pytest.raises(HIRError, match="unknown attr"):
        h.add(Op.GELU_TANH, [x], {"approx": True})
    with pytest.raises(HIRError, match="missing required attr"):
        h.add(Op.SCALE, [x])


def test_graph_meta_round_trips_and_counts_for_equality() -> None:
    h = tiny_block()
    h.meta["bounds"] = {"SEQ": 512, "BATCH": 1}
    text = print_hir(h)
    assert text.startswith('hir tiny {"bounds": {"SEQ": 512, "BATCH": 1}} {\n')
    back = parse_hir(text)
    assert back == h and back.meta == h.meta and print_hir(back) == text
    loaded = serialize.loads(serialize.dumps(h))
    assert loaded == h and loaded.meta == h.meta and serialize.dumps(loaded) == serialize.dumps(h)
    assert h.copy().meta == h.meta and h.copy().meta is not h.meta
    assert tiny_block() != h  # same nodes, different bounds
    assert print_hir(tiny_block()).startswith("hir tiny {\n")  # no meta: the header is unchanged
    with pytest.raises(HIRError, match="bad graph meta"):
        parse_hir(text.replace('"SEQ": 512', '"SEQ": 512,,'))
