"""The paged-cache ops in the reference interpreter: `paged_kv_write` puts each row where its
position lives, and `paged_attention` equals attention over each sequence's contiguous cache."""

from __future__ import annotations

import numpy as np
import pytest

from rlx.errors import HIRError
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.shapes import SEQ, sym
from rlx.hir.tensor_type import TensorType
from tests.hir.paged import PagedStep, paged_graph, paged_step


def _loop_attention(step: PagedStep, scale: float, softcap: float, window: int) -> np.ndarray:
    """Per token and head in float64, straight from the definition (no shared code with rlx)."""
    _, hq, tokens, _ = step.q.shape
    group = hq // step.k_full[0].shape[1]
    out = np.zeros((1, hq, tokens, step.v_full[0].shape[-1]))
    for t in range(tokens):
        n, p = int(step.token_seq[t]), int(step.positions[0, t])
        lo = max(0, p - window + 1) if window else 0
        for h in range(hq):
            k = step.k_full[n][0, h // group, lo:p + 1].astype(np.float64)
            v = step.v_full[n][0, h // group, lo:p + 1].astype(np.float64)
            s = k @ step.q[0, h, t].astype(np.float64) * scale
            if softcap:
                s = np.tanh(s / softcap) * softcap
            w = np.exp(s - s.max())
            out[0, h, t] = (w / w.sum()) @ v
    return out


def test_paged_kv_write_puts_each_row_at_its_page_and_slot() -> None:
    step = paged_step([3, 0, 6], [2, 5, 1])
    got = Interpreter(paged_graph()).run(step.feeds())
    page = step.k_pool.shape[2]
    want = step.k_pool.copy()
    for t in range(step.token_seq.size):
        n, p = int(step.token_seq[t]), int(step.positions[0, t])
        want[step.page_table[n, p // page], :, p % page] = step.k_new[0, :, t]
    np.testing.assert_array_equal(got["k_pool"], want)
    assert not np.array_equal(want, step.k_pool)
    # every position of every sequence now holds its contiguous row
    for n, full in enumerate(step.k_full):
        for j in range(full.shape[2]):
            np.testing.assert_array_equal(got["k_pool"][step.page_table[n, j // page], :, j % page], full[0, :, j])


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (3, 0.0), (5, 4.0)])
def test_paged_attention_equals_attention_from_the_definition(window: int, softcap: float) -> None:
    """Three sequences (a prefill chunk from 0, a chunk after a past, a decode past the window),
    GQA 4:2, shuffled pages; float32 against float64: summation order only."""
    step = paged_step([0, 5, 9], [6, 3, 1], seed=window)
    got = Interpreter(paged_graph(scale=0.3, softcap=softcap, window=window)).run(step.feeds())["out"]
    np.testing.assert_allclose(got, _loop_attention(step, 0.3, softcap, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16])
def test_paged_attention_rounds_as_the_fused_attention_op(dtype: DType) -> None:
    """The same sequence through `attention` over its contiguous cache: equal (f16 included: the
    probabilities are rounded to v's dtype in both)."""
    step = paged_step([4], [3], dtype=dtype.numpy, seed=7)
    got = Interpreter(paged_graph(dtype=dtype, scale=0.5, window=4)).run(step.feeds())["out"]
    s = sym(SEQ)
    h = HIR("contiguous")
    q = h.input("q", TensorType(dtype, (1, 4, s, 16)))
    k = h.input("k", TensorType(dtype, (1, 2, 7, 16)))
    v = h.input("v", TensorType(dtype, (1, 2, 7, 16)))
    pos = h.input("positions", TensorType(DType.I32, (1, s)))
    h.set_output("out", h.add(Op.ATTENTION, [q, k, v, pos], {"scale": 0.5, "window": 4}))
    want = Interpreter(h).run({"q": step.q, "k": step.k_full[0], "v": step.v_full[0], "positions": step.positions})
    assert got.dtype == dtype.numpy
    np.testing.assert_array_equal(got, want["out"])


def test_paged_type_rules_name_the_operand() -> None:
    h = paged_graph()
    q = h.inputs["q"].id
    pos = h.input("flat_positions", TensorType(DType.I32, (sym(SEQ),)))
    args = [q, h.inputs["k_pool"].id, h.inputs["v_pool"].id, h.inputs["page_table"].id, h.inputs["token_seq"].id, pos]
    with pytest.raises(HIRError, match="positions"):
        h.add(Op.PAGED_ATTENTION, args)
