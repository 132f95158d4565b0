"""Schedules for `weight_kernels`: on CPU the GEMV of a decode step (`Gemv`) and the GEMM of a
prefill (`Gemm`), tiled by the target's `machine.kernel_params` (the GEMM's rows by the tile the
kernel recorded when it padded them); on GPUs the decode GEMV over quantized blocks in the plain
layout (`QuantGemvGpu`; prefill linears there are dlight's Matmul).

Each is found by its anchor block's name in the fused PrimFunc; injective producers of x (a
reshape, a cast) are inlined, and elementwise consumers (a residual add, a cast back to f16) are
computed where each tile of outputs is finished, so the output is written once. The tilings,
each number's reason and the measurements: docs/kernels.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import TypeAlias

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from rlx.targets.machine import LANES, kernel_params
from rlx.targets.schedule_tools import attempt, root_blocks, static_extent
from rlx.targets.weight_kernels import (
    DEQUANT,
    GEMM,
    GEMM_PANEL,
    GEMV,
    GEMV_BLOCK,
    GEMV_XSUM,
    QLINEAR,
    ROW_TILE_ATTR,
)

SCOPE = "global"   # small buffers allocated inside a task become stack arrays ("local" would be a heap workspace)

Block: TypeAlias = s_tir.schedule.SBlockRV


def _named(sch: s_tir.Schedule, blocks: Sequence[Block]) -> dict[str, Block]:
    return {sch.get(b).name_hint: b for b in blocks}


def _inline_producers(sch: s_tir.Schedule, blocks: Sequence[Block], keep: set[str]) -> bool:
    """Inline every injective block before the kernel's own (False if one refuses)."""
    return all(attempt(sch, partial(sch.compute_inline, b)) for b in blocks if sch.get(b).name_hint not in keep)


def _epilogue(sch: s_tir.Schedule, consumers: Sequence[Block], loop: s_tir.schedule.LoopRV) -> None:
    for c in consumers:  # one that refuses stays its own loop nest: correct, one more pass over the output
        attempt(sch, partial(sch.reverse_compute_at, c, loop))


def _split_lanes(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> None:
    """Unroll a loop of whole vectors and vectorise its LANES lanes."""
    outer, lanes = sch.split(loop, [None, LANES])
    sch.unroll(outer)
    sch.vectorize(lanes)


def _anchored(func: tirx.PrimFunc, anchor: str, stages: set[str]) -> tuple[s_tir.Schedule, dict[str, Block],
                                                                            list[Block]] | None:
    """A schedule of `func` if it holds the block `anchor`, with x's producers inlined (the
    kernel's own `stages` kept): (schedule, blocks by name, the blocks after the anchor)."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    blocks = root_blocks(sch)
    named = _named(sch, blocks)
    if anchor not in named:
        return None
    at = [sch.get(b).name_hint for b in blocks].index(anchor)
    if not _inline_producers(sch, blocks[:at], stages):
        return None
    return sch, named, blocks[at + 1:]


def _row_tile(rows: int | None, most: int) -> int:
    """The largest divisor of `rows` up to `most` (a whole number of tiles: no guarded tail)."""
    if rows is None:
        return 1
    return max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)


class Gemv(ScheduleRule):
    """Decode linears: per task a few il16 groups; x's rows in register tiles of
    `KernelParams.gemv_rows` run inside the reduction, so a weight block is read (and a
    quantized one decoded) once for every row of the tile."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        found = _anchored(func, GEMV, {GEMV_BLOCK, GEMV_XSUM})
        if found is None:
            return None
        sch, named, consumers = found
        params = kernel_params(target)
        y = named[GEMV]
        *lead, n, red = sch.get_loops(y)
        extents = [static_extent(sch.get(loop).extent) for loop in lead]
        rows = None if None in extents else math.prod(e for e in extents if e is not None)
        quant = GEMV_BLOCK in named
        # a quantized tile holds a block sum and an accumulator per row; a float one an
        # accumulator per row and group: the same registers either way
        most = params.gemv_rows if quant else max(2 * params.gemv_rows // params.gemv_groups, 1)
        rows_outer, rows_inner = [], []
        if lead:
            m = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            mo, mi = sch.split(m, [None, _row_tile(rows, most)])
            rows_outer, rows_inner = [mo], [mi]
        task, group, lane = sch.split(n, [None, params.gemv_groups, LANES])
        sch.parallel(task)
        if quant:
            # one group (16 rows of w) at a time over all of K: one sequential weight stream per thread
            sch.reorder(task, group, *rows_outer, red, *rows_inner, lane)
        else:
            # float: per k, the tile's rows and the task's groups are independent FMA chains
            sch.reorder(task, *rows_outer, red, *rows_inner, group, lane)
            sch.unroll(group)
        acc = sch.cache_write(y, 0, SCOPE)  # the tile's outputs stay in registers over the reduction
        sch.reverse_compute_at(acc, rows_outer[0] if rows_outer else (group if quant else task))
        for loop in rows_inner:
            sch.unroll(loop)
        sch.vectorize(lane)
        _split_lanes(sch, sch.get_loops(acc)[-1])
        if quant:
            part = named[GEMV_BLOCK]
            sch.compute_at(part, red, preserve_unit_loops=True)
            sch.set_scope(part, 0, SCOPE)
            *own, groups, _, chains, lanes, j = sch.get_loops(part)[-(len(lead) + 5):]
            # per stored value: one load and decode of a weight vector, then an FMA per row
            sch.reorder(j, *own, groups, chains, lanes)
            for loop in (j, *own, groups, chains):
                sch.unroll(loop)
            sch.vectorize(lanes)
        # GEMV_XSUM (the block sums of x) stays at the root: computed once, before the parallel loop
        _epilogue(sch, consumers, task)
        return sch


class Gemm(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        found = _anchored(func, GEMM, {GEMM_PANEL})
        if found is None:
            return None
        sch, named, consumers = found  # consumers: rlx_gemm_out first, then any epilogue
        y = named[GEMM]
        mr = int(sch.get(y).annotations[ROW_TILE_ATTR])  # what the kernel padded its rows to
        *outer, row, n, k = sch.get_loops(y)
        ro, ri = sch.split(row, [None, mr])
        no, ni = sch.split(n, [None, kernel_params(target).gemm_cols])
        sch.reorder(no, *outer, ro, k, ri, ni)
        sch.parallel(no)
        sch.unroll(ri)
        _split_lanes(sch, ni)
        if GEMM_PANEL in named:
            panel = named[GEMM_PANEL]
            sch.compute_at(panel, no, preserve_unit_loops=True)
            sch.set_scope(panel, 0, SCOPE)
            *_, lanes = sch.get_loops(panel)
            sch.vectorize(lanes)
        _epilogue(sch, consumers, ro)
        return sch


class QuantGemvGpu(ScheduleRule):
    """GPU decode GEMV over plain-layout blocks (`rlx_dequant` + `rlx_qlinear`, a few static rows):
    dlight's GEMV rule rejects it (its analysis wants every read a single element, and a block's
    scale is two bytes of the uint8 blocks). The decode is inlined into the dot product and each
    output row is a warp: its 32 lanes stride over K (consecutive values, so consecutive bytes of
    the row's blocks), summed with a cross-thread reduction; `ROWS_PER_BLOCK` rows per thread
    block; an elementwise epilogue runs on the reducing thread."""

    WARP = 32
    ROWS_PER_BLOCK = 4
    MAX_ROWS = 4  # x rows it takes (each re-reads the weights); more: dlight's Matmul

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if "thread_warp_size" not in target.attrs:
            return None
        found = _anchored(func, QLINEAR, set())  # the decode stage and x's producers inlined
        if found is None or DEQUANT not in found[1]:
            return None
        sch, named, consumers = found
        *lead, n, k = sch.get_loops(named[QLINEAR])
        extents = [static_extent(sch.get(loop).extent) for loop in (*lead, n, k)]
        sizes = [e for e in extents if e is not None]
        if len(sizes) < len(extents) or math.prod(sizes[:-2]) > self.MAX_ROWS:
            return None  # a prefill (symbolic or many rows): dlight's Matmul
        if sizes[-1] % self.WARP or sizes[-2] % self.ROWS_PER_BLOCK:
            return None
        by, ty = sch.split(n, [None, self.ROWS_PER_BLOCK])
        ko, tx = sch.split(k, [None, self.WARP])
        sch.reorder(by, ty, *lead, ko, tx)
        sch.bind(by, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        for c in consumers:
            sch.reverse_compute_at(c, ty)
        return sch
