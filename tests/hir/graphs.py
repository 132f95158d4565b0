"""Small HIR graphs for compiler tests, and a hypothesis strategy for random well-typed graphs."""

from __future__ import annotations

from hypothesis import strategies as st

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import BATCH, SEQ, sym
from rlx.hir.tensor_type import TensorType

B, S = sym(BATCH), sym(SEQ)


def f32(*shape: object) -> TensorType:
    return TensorType(DType.F32, tuple(shape))  # type: ignore[arg-type]


def tiny_block(hidden: int = 8, heads: int = 2) -> HIR:
    """Embedding, norm, one attention head group and a GeGLU MLP: every op family once."""
    hd = hidden // heads
    h = HIR("tiny")
    ids = h.input("input_ids", TensorType(DType.I64, (B, S)))
    pos = h.input("positions", TensorType(DType.I64, (B, S)))
    emb = h.add(Op.EMBED, [h.param("embed", f32(16, hidden)), ids])
    x = h.add(Op.SCALE, [emb], {"value": 2.5})
    n = h.add(Op.RMSNORM, [x, h.param("norm", f32(hidden))], {"eps": 1e-6, "offset": 1.0})
    q = h.add(Op.LINEAR, [n, h.param("wq", f32(hidden, hidden))])
    q = h.add(Op.RESHAPE, [q], {"shape": ("BATCH", "SEQ", heads, hd)})
    q = h.add(Op.TRANSPOSE, [q], {"perm": (0, 2, 1, 3)})
    inv = h.add(Op.CONST, attrs={"value": (1.0, 0.1)}, type=f32(hd // 2))
    q = h.add(Op.ROPE, [q, pos, inv])
    kt = h.add(Op.TRANSPOSE, [q], {"perm": (0, 1, 3, 2)})
    s = h.add(Op.MATMUL, [q, kt])
    s = h.add(Op.SOFTCAP, [s], {"cap": 50.0})
    s = h.add(Op.CAUSAL_MASK, [s, pos], {"window": 2})
    p = h.add(Op.SOFTMAX, [s])
    o = h.add(Op.MATMUL, [p, q])
    o = h.add(Op.TRANSPOSE, [o], {"perm": (0, 2, 1, 3)})
    o = h.add(Op.RESHAPE, [o], {"shape": ("BATCH", "SEQ", hidden)})
    r = h.add(Op.ADD, [x, o])
    g = h.add(Op.GELU_TANH, [h.add(Op.LINEAR, [r, h.param("wg", f32(12, hidden))])])
    u = h.add(Op.LINEAR, [r, h.param("wu", f32(12, hidden))])
    m = h.add(Op.LINEAR, [h.add(Op.MUL, [g, u]), h.param("wd", f32(hidden, 12))])
    out = h.add(Op.SLICE, [h.add(Op.ADD, [r, m])], {"axis": 1, "start": -1, "stop": None})
    h.set_output("hidden", out)
    return h


UNARY = [(Op.GELU_TANH, {}), (Op.SOFTMAX, {}), (Op.SCALE, {"value": 0.5}), (Op.SOFTCAP, {"cap": 3.0}),
         (Op.RMSNORM, {"eps": 1e-5, "offset": 0.0})]
BINARY = [Op.ADD, Op.MUL]


@st.composite
def random_graphs(draw: st.DrawFn, max_nodes: int = 12) -> HIR:
    """Random DAGs of elementwise / norm ops over [BATCH, SEQ, 4] values plus a linear or two."""
    h = HIR("random")
    values = [h.input("x", f32(B, S, 4)), h.input("y", f32(B, S, 4))]
    for _ in range(draw(st.integers(1, max_nodes))):
        kind = draw(st.sampled_from(["unary", "binary", "linear"]))
        a = draw(st.sampled_from(values))
        if kind == "unary":
            op, attrs = draw(st.sampled_from(UNARY))
            values.append(h.add(op, [a], attrs))
        elif kind == "binary":
            values.append(h.add(draw(st.sampled_from(BINARY)), [a, draw(st.sampled_from(values))]))
        else:
            values.append(h.add(Op.LINEAR, [a, h.param(f"w{len(values)}", f32(4, 4))]))
    for k, v in enumerate(draw(st.lists(st.sampled_from(values[2:]), min_size=1, max_size=3, unique=True))):
        h.set_output(f"out{k}", v)
    return h
