"""TE computes for the ops that read quantized weights: a linear over blocks, an embedding lookup.

Each decodes the blocks it needs with `quant_decode.value` (the same float32 values the
reference interpreter computes with) and never materialises the whole float weight: the linear
is two stages in one PrimFunc, `rlx_dequant` (w[n, k] from the blocks) and the contraction
`rlx_qlinear`, so a schedule decides where the decoding happens (inlined into a GEMV's
reduction, or one tile at a time into a small buffer a GEMM reuses for every row; see
`schedules.py`).
"""

from __future__ import annotations

from tvm import te, tirx

from rlx.hir.quant import QuantFormat, quant_format
from rlx.targets.quant_decode import value

DEQUANT = "rlx_dequant"
QLINEAR = "rlx_qlinear"
QEMBED = "rlx_qembed"
F32 = "float32"


def logical_k(blocks: te.Tensor, fmt: QuantFormat) -> tirx.PrimExpr:
    return blocks.shape[-1] // fmt.block_bytes * fmt.block


def dequant(blocks: te.Tensor, fmt: QuantFormat) -> te.Tensor:
    """w[n, k] in float32 from a [N, row_bytes] weight stored in `fmt`."""
    return te.compute((blocks.shape[0], logical_k(blocks, fmt)), lambda n, k: value(fmt, blocks, n, k), name=DEQUANT)


def qlinear(x: te.Tensor, blocks: te.Tensor, fmt: str) -> te.Tensor:
    """`y[..., n] = sum_k x[..., k] * w[n, k]`, accumulated in float32 whatever x's dtype (`fmt`
    names the format: emit_te passes strings, not objects)."""
    w = dequant(blocks, quant_format(fmt))
    k = te.reduce_axis((0, x.shape[-1]), name="k")

    def body(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        xi = x[(*i[:-1], k)]
        return te.sum((xi if xi.dtype == F32 else xi.astype(F32)) * w[i[-1], k], axis=k)

    return te.compute((*x.shape[:-1], blocks.shape[0]), body, name=QLINEAR)


def qembed(blocks: te.Tensor, ids: te.Tensor, fmt: str, dtype: str = F32) -> te.Tensor:
    """Rows `ids` of a [V, row_bytes] table stored in `fmt`: only those rows are decoded."""
    form = quant_format(fmt)

    def body(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        v = value(form, blocks, ids[i[:-1]].astype("int64"), i[-1])
        return v if dtype == F32 else v.astype(dtype)

    return te.compute((*ids.shape, logical_k(blocks, form)), body, name=QEMBED)
