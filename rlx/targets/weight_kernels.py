"""TE computes that read weights in a kernel layout (`layouts.py`), quantized or not.

Which formulation a linear gets depends on its rows (the `M` of `x [..., M, K]`):

- **GEMV** (a static M of at most `GEMV_ROWS`: a decode step of up to that many sequences): the
  il16 layout's lanes are output rows; a quantized weight's products are summed per block over
  the stored integers (`rlx_gemv_block`, `chains` independent chains for one row, one chain a
  row for several: the rows are the independent chains), then each block's scale and offset
  applied once (`rlx_gemv_xsum`: the block sums of x). The schedule runs the rows in register
  tiles (`KernelParams.gemv_rows`) inside the block loop, so each weight block is read and
  decoded once for a tile of rows: M rows cost about what one does while the weights stream.
  The values are the weights' exactly; only the float32 summation order differs from
  dequantize-then-dot.
- **GEMM** (anything else: a prefill): a quantized weight's 16-row panels are decoded once
  (`rlx_gemm_panel`) and reused by every row of x in a register-tiled micro-kernel (`rlx_gemm`),
  x's rows padded to the target's tile (`row_tile`); float weights in il16 are read as they are.

Weights in the plain layout (GPU targets, row counts not a multiple of 16) keep the plain
formulations: `kernels.linear`, or the GGUF blocks as stored decoded by `quant_decode` in an
`rlx_dequant` stage + `rlx_qlinear`. Schedules find each kernel by its anchor block
(`weight_schedules.py`). Embedding lookups decode only the rows they read, in any layout. The
layout, the tilings and their numbers: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tvm import te, tirx

from rlx.hir.quant import QuantFormat, quant_format
from rlx.targets.block_planes import PlaneReader, planes_of
from rlx.targets.layouts import IL16
from rlx.targets.machine import CONSERVATIVE_PARAMS, LANES
from rlx.targets.quant_decode import Expr, Rows, value

F32 = "float32"
GEMV_ROWS = 16         # at most this many rows (static) run as a GEMV
ROW_TILE_ATTR = "rlx.row_tile"  # the GEMM block's annotation: the MR its rows were padded to

GEMV = "rlx_gemv"
GEMV_BLOCK = "rlx_gemv_block"
GEMV_XSUM = "rlx_gemv_xsum"
GEMM = "rlx_gemm"
GEMM_PANEL = "rlx_gemm_panel"
GEMM_OUT = "rlx_gemm_out"
DEQUANT = "rlx_dequant"
QLINEAR = "rlx_qlinear"
LOOKUP = "rlx_lookup"


def _f32(e: Expr) -> Expr:
    return e if e.dtype == F32 else e.astype(F32)


@dataclass(frozen=True)
class _Weight:
    """A [N, K] weight as a kernel takes it: `tensor` in `layout`, quantized in `fmt` or float."""

    tensor: te.Tensor
    layout: str
    fmt: QuantFormat | None
    k: int

    @property
    def planes(self) -> PlaneReader:
        assert self.fmt is not None and self.layout == IL16
        return PlaneReader(self.tensor, planes_of(self.fmt), self.k)

    @property
    def groups(self) -> int:
        """il16: groups of 16 rows."""
        return self.planes.groups if self.fmt is not None else int(self.tensor.shape[0])

    @property
    def rows(self) -> Expr:
        return self.groups * LANES if self.layout == IL16 else self.tensor.shape[0]

    def element(self) -> Callable[[Expr, Expr], Expr]:
        """w[r, k] as float32."""
        w, fmt = self.tensor, self.fmt
        if fmt is not None:
            if self.layout == IL16:
                return self.planes.value
            blocks = Rows(w)
            return lambda r, k: value(fmt, blocks, r, k)
        if self.layout == IL16:
            return lambda r, k: _f32(w[r // LANES, k, r % LANES])
        return lambda r, k: _f32(w[r, k])


def _rows_static(x: te.Tensor) -> int | None:
    """The number of rows x holds if it is static (every dim but the last)."""
    n = 1
    for d in x.shape[:-1]:
        if not isinstance(d, tirx.IntImm):
            return None
        n *= int(d)
    return n


def is_gemv(x: te.Tensor, layout: str) -> bool:
    rows = _rows_static(x)
    return layout == IL16 and rows is not None and rows <= GEMV_ROWS


def contraction(x: te.Tensor, w: te.Tensor, layout: str, fmt: str = "",
                row_tile: int = CONSERVATIVE_PARAMS.gemm_rows, chains: int = CONSERVATIVE_PARAMS.gemv_chains
                ) -> te.Tensor:
    """`y[..., n] = sum_k x[..., k] * w[n, k]` in float32, for a weight in `layout` (quantized in
    format `fmt`, "" for float; emit_te passes strings, not objects). `row_tile` and `chains` are
    the target's `KernelParams.gemm_rows` / `gemv_chains`."""
    weight = _Weight(w, layout, quant_format(fmt) if fmt else None, int(x.shape[-1]))
    if is_gemv(x, layout):
        chains = chains if _rows_static(x) == 1 else 1  # several rows: they are the independent chains
        return _gemv_quant(x, weight, chains) if weight.fmt is not None else _gemv_float(x, weight)
    if layout == IL16:
        return _gemm(x, weight, row_tile)
    if weight.fmt is not None:
        return _dequant_linear(x, weight)
    raise ValueError("plain float weights use kernels.linear")


def _dot(x: te.Tensor, rows: Expr, get: Callable[[Expr, Expr], Expr], name: str) -> te.Tensor:
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    return te.compute((*x.shape[:-1], rows), lambda *i: te.sum(_f32(x[(*i[:-1], k)]) * get(i[-1], k), axis=k),
                      name=name)


def _gemv_float(x: te.Tensor, w: _Weight) -> te.Tensor:
    """il16 float weights: lanes are output rows, the whole reduction is FMAs."""
    return _dot(x, w.rows, w.element(), GEMV)


def _gemv_quant(x: te.Tensor, w: _Weight, chains: int) -> te.Tensor:
    planes = w.planes
    bs = planes.planes.block
    lead, blocks = x.shape[:-1], w.k // bs
    per_chain = bs // chains
    j = te.reduce_axis((0, per_chain), name="j")

    def block_sum(*i: Expr) -> Expr:
        *m, g, b, c, lane = i
        kk = b * bs + j * chains + c
        return te.sum(_f32(x[(*m, kk)]) * planes.lane_quant(g, lane, kk).astype(F32), axis=j)

    part = te.compute((*lead, w.groups, blocks, chains, LANES), block_sum, name=GEMV_BLOCK)
    zero = tirx.const(0, "int64")
    has_offset = planes.block_offset(zero, zero) is not None
    if has_offset:
        jx = te.reduce_axis((0, bs), name="jx")
        xsum = te.compute((*lead, blocks), lambda *i: te.sum(_f32(x[(*i[:-1], i[-1] * bs + jx)]), axis=jx),
                          name=GEMV_XSUM)
    b = te.reduce_axis((0, blocks), name="b")

    def out(*i: Expr) -> Expr:
        *m, n = i
        acc = part[(*m, n // LANES, b, 0, n % LANES)]
        for c in range(1, chains):
            acc = acc + part[(*m, n // LANES, b, c, n % LANES)]
        term = planes.scale(n, b) * acc
        if has_offset:
            term = term + planes.block_offset(n, b) * xsum[(*m, b)]
        return te.sum(term, axis=b)

    return te.compute((*lead, w.rows), out, name=GEMV)


def _gemm(x: te.Tensor, w: _Weight, row_tile: int) -> te.Tensor:
    """il16 weights, any rows: a quantized weight's 16-row panels decoded to float32 first.

    The rows (x's second-to-last axis) are padded to a multiple of `row_tile` (the schedule's MR,
    recorded on the block as `ROW_TILE_ATTR` so the schedule tiles by the same number),
    reading the last row again past the end, so every tile runs the same unguarded register loop
    even for a symbolic row count; `rlx_gemm_out` keeps the real rows (the only guarded writes)."""
    get = w.element()
    if w.fmt is not None:
        panel = te.compute((w.groups, w.k, LANES), lambda g, k, lane: get(g * LANES + lane, k), name=GEMM_PANEL)
        get = lambda r, k: panel[r // LANES, k, r % LANES]  # noqa: E731
    *outer, seq = x.shape[:-1]
    padded = (seq + row_tile - 1) // row_tile * row_tile
    kk = te.reduce_axis((0, w.k), name="k")
    acc = te.compute((*outer, padded, w.rows),
                     lambda *i: te.sum(_f32(x[(*i[:-2], tirx.min(i[-2], seq - 1), kk)]) * get(i[-1], kk), axis=kk),
                     name=GEMM, attrs={ROW_TILE_ATTR: row_tile})

    def out(*i: Expr) -> Expr:
        return acc[i]

    return te.compute((*outer, seq, w.rows), out, name=GEMM_OUT)


def _dequant_linear(x: te.Tensor, w: _Weight) -> te.Tensor:
    """Plain-layout blocks: a decode stage and a contraction in one PrimFunc (GPU rules fuse the
    decode into their GEMV / matmul)."""
    dense = te.compute((w.rows, w.k), w.element(), name=DEQUANT)
    return _dot(x, w.rows, lambda r, k: dense[r, k], QLINEAR)


def lookup(w: te.Tensor, ids: te.Tensor, layout: str, fmt: str = "", dtype: str = F32, k: int = 0) -> te.Tensor:
    """Rows `ids` of a [V, k] table in `layout` (quantized in `fmt`): only those rows are read."""
    get = _Weight(w, layout, quant_format(fmt) if fmt else None, k).element()

    def body(*i: Expr) -> Expr:
        v = get(ids[i[:-1]].astype("int64"), i[-1])
        return v if dtype == F32 else v.astype(dtype)

    return te.compute((*ids.shape, k), body, name=LOOKUP)
