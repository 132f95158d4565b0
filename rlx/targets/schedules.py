"""CPU schedules for the fused PrimFuncs, and the pass that applies a rule list per target.

TVM's CPU pipeline schedules nothing (an unscheduled 640x262144 GEMV runs ~100x below memory speed),
and dlight has no CPU matmul rule, so the heavy kernels get our own:

- `Contraction` finds the one contraction block a fused PrimFunc holds by its kernel name
  (`kernels.CONTRACTIONS`) and schedules it by operand layout:
  - "nt" (linear, attention scores, MoE experts: both operands contiguous along the reduction):
    the output column axis n is split into tiles and the tile loop runs in parallel; under it the
    row loop, then each output element is a 16-lane partial-sum vector (`rfactor`, kept in a
    local buffer, the lane loop vectorized) reduced at the end. The weight tile stays in cache
    across all rows (prefill) and a GEMV streams the weights once, near numpy's speed (unrolling
    the lanes instead left LLVM emitting scalar FMAs at half of it; bench/ measures it).
  - "nn" (probs @ v, plain matmul): rows in parallel, the reduction outside the contiguous output
    axis, whose 16-wide chunks are vectorized.
  `vectorize` is applied while the block still has its init (no `decompose_reduction`): after
  decomposing, TVM 0.27 refuses it (the update block has no compact dataflow).
  Fused elementwise epilogues are computed where each output element is produced.
- `RowReduction` for norms, softmax and top-k (rows in parallel, each row's blocks under its loop).
- `ParallelOuter`: elementwise chains inlined into one loop nest, vectorised, parallel when large.

Every function records the rule that scheduled it (`rlx.schedule` attr; `schedule_report`). A
rule of ours that raises, or whose schedule the first TIR lowering steps reject, is an error
(`ScheduleError`, raised by `check_schedules` after the pass), never a fall-through; only dlight's
generic rules may fail and pass a function on, the reason recorded (`schedule_skipped`). The
linear kernels, their tilings and these rules: docs/kernels.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from rlx.errors import RlxError
from rlx.targets.flash_attention import FLASH_ATTR, FlashSpec, flash_attention
from rlx.targets.kernels import CONTRACTIONS, MATERIALIZED
from rlx.targets.machine import LANES, kernel_params, vector_isa
from rlx.targets.schedule_tools import RULE_ERRORS, SCHEDULE_ERRORS, attempt, root_blocks, static_extent
from rlx.targets.weight_schedules import Gemm, Gemv, QuantGemvGpu

TILE_N = 16  # output columns per parallel task
SCHEDULE_ATTR = "rlx.schedule"
EXTERN = "extern"  # what the report says of a function that only calls a runtime library

def _lanes(extent: tirx.PrimExpr, most: int = LANES) -> int:
    """The widest power-of-two split (<= most) that divides a static extent; 1 if none."""
    n = static_extent(extent)
    lanes = most
    while n is not None and lanes > 1 and n % lanes:
        lanes //= 2
    return lanes if n is not None else 1


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> tirx.PrimExpr:
    return sch.get(loop).extent


def _schedule_nt(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
                 consumers: Sequence[s_tir.schedule.SBlockRV]) -> None:
    *rows, col, red = sch.get_loops(block)
    lanes = _lanes(_extent(sch, red))
    if lanes > 1:
        _, lane = sch.split(red, [None, lanes])
        partial = sch.rfactor(lane, factor_axis=0)
        *rows, col, lane = sch.get_loops(block)  # the final block now reduces over the lanes
    row = sch.fuse(*rows) if len(rows) > 1 else (rows[0] if rows else None)
    n = static_extent(_extent(sch, col))
    tile, inner = sch.split(col, [None, min(TILE_N, n) if n else TILE_N])
    sch.reorder(tile, *([row] if row is not None else []), inner)
    sch.parallel(tile)
    if lanes > 1:
        # preserve_unit_loops: one new loop per block var (lane, rows..., col, k_outer), so the lane
        # and k loops are found by position even when K == lanes leaves a 1-trip k loop
        sch.compute_at(partial, inner, preserve_unit_loops=True)
        sch.set_scope(partial, 0, "local")
        own = sch.get_loops(partial)[-len(sch.get(partial).iter_vars):]
        lane_loop, k_outer = own[0], own[-1]
        sch.reorder(k_outer, lane_loop)
        sch.vectorize(lane_loop)  # before any decompose_reduction: see the module docstring
    for c in consumers:
        attempt(sch, functools.partial(sch.reverse_compute_at, c, inner))


def _schedule_nn(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV,
                 consumers: Sequence[s_tir.schedule.SBlockRV]) -> None:
    *rows, col, red = sch.get_loops(block)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.reorder(red, col)
    sch.parallel(row)
    lanes = _lanes(_extent(sch, col))
    if lanes > 1:
        _, vec = sch.split(col, [None, lanes])
        sch.vectorize(vec)
    for c in consumers:
        attempt(sch, functools.partial(sch.reverse_compute_at, c, row))


_BY_LAYOUT: dict[str, Callable[[s_tir.Schedule, s_tir.schedule.SBlockRV, Sequence[s_tir.schedule.SBlockRV]], None]] = {
    "nt": _schedule_nt,
    "nn": _schedule_nn,
}


class Contraction(ScheduleRule):
    """Our contraction kernels (found by block name), with their fused producers and epilogues."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        found = [(b, CONTRACTIONS[sch.get(b).name_hint]) for b in blocks if sch.get(b).name_hint in CONTRACTIONS]
        if len(found) != 1:
            return None
        block, layout = found[0]
        names = [sch.get(b).name_hint for b in blocks]
        at = names.index(sch.get(block).name_hint)
        for producer in blocks[:at]:  # injective producers (a fused transpose, a reshape): inline
            if not attempt(sch, functools.partial(sch.compute_inline, producer)):
                return None
        consumers = blocks[at + 1:]
        _BY_LAYOUT[layout](sch, block, consumers)
        return sch


def _is_reduction(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _leading_spatial(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> int:
    n = 0
    for iv in sch.get(block).iter_vars:
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        n += 1
    return n


def _writes_output(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> bool:
    """Whether a root-level block writes a buffer of the function's (not one the root allocates)."""
    local = sch.mod["main"].body.block.alloc_buffers
    return any(not any(w.source.same_as(b) for b in local) for w in sch.get(block).writes)


class RowReduction(ScheduleRule):
    """Row-wise reductions with elementwise neighbours (RMSNorm, softmax, their fused adds, the
    top-k passes): one parallel loop over the rows, every block computed per row under it.

    The row loop is the one of the first block after the last reduction that writes an output of
    the function (usually the last block): `compute_at` cannot move an output block, so with
    several (top-k's indices, then its values read through them) the later ones are moved under
    the first one's loop with `reverse_compute_at`.

    dlight's `cpu.Reduction` was tried first and dropped: on a decode-shaped RMSNorm
    ([1, 1, 640]) it parallelised the 640 output columns and recomputed the whole row's sum of
    squares under each: orders of magnitude slower than one pass per row.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        reductions = [i for i, b in enumerate(blocks) if _is_reduction(sch, b)]
        if not reductions or reductions[-1] == len(blocks) - 1:
            return None
        anchor = next((i for i in range(reductions[-1] + 1, len(blocks)) if _writes_output(sch, blocks[i])),
                      len(blocks) - 1)
        rows = min(_leading_spatial(sch, blocks[i]) for i in reductions)
        loops = sch.get_loops(blocks[anchor])
        if rows == 0 or len(loops) <= rows:
            return None
        row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        sch.parallel(row)
        for b in reversed(blocks[:anchor]):
            sch.compute_at(b, row, preserve_unit_loops=True)
        for b in blocks[anchor + 1:]:
            sch.reverse_compute_at(b, row, preserve_unit_loops=True)
        return sch


class ParallelOuter(ScheduleRule):
    """Injective functions (and the fallback for anything else): every intermediate block is
    inlined into its consumer, so a chain of elementwise steps (GELU's seven) is one pass over
    memory, not one loop and one buffer each; then each remaining loop nest's leading spatial
    loops are fused and run in parallel when there is enough work to pay for waking the pool
    (`KernelParams.parallel_min` elements), the innermost one vectorised by LANES when that divides its static
    extent (a fused index over symbolic extents would need divisions per lane).

    Blocks named in `kernels.MATERIALIZED` are kept (a stage computed once per row and read many
    times, like RoPE's cos / sin)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        for block in reversed(root_blocks(sch)[:-1]):
            if sch.get(block).name_hint not in MATERIALIZED and not _writes_output(sch, block):
                attempt(sch, functools.partial(sch.compute_inline, block))
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        for info in infos:
            kinds = info.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))
            if lead == 0:
                continue
            loops = [it.loop_rv for it in info.iters[:lead]]
            lanes = 1
            inner = static_extent(_extent(sch, loops[-1]))
            if lead == len(kinds) and inner is not None and inner % LANES == 0:
                rest, vector = sch.split(loops[-1], [None, LANES])
                sch.vectorize(vector)
                loops[-1], lanes = rest, LANES
            outer = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            total = static_extent(_extent(sch, outer))
            if total is None or total * lanes >= kernel_params(target).parallel_min:
                sch.parallel(outer)
        return sch


def _vector_target(target: Target) -> tuple[int, int, int]:
    """(f32 lanes, vector registers, cores) of an LLVM target: the vector unit `machine.vector_isa`
    reads (AVX-512 16 lanes x 32 registers, AVX2 8 x 16, NEON 4 x 32)."""
    isa = vector_isa(target)
    return isa.lanes, isa.registers, int(target.attrs.get("num-cores", 1) or 1)


class FlashAttention(ScheduleRule):
    """The flash attention kernels (`flash_attention.py`) are written scheduled; this rule only
    regenerates each one for the target's vector width, register count and cores."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or FLASH_ATTR not in func.attrs:
            return None
        spec = FlashSpec.from_json(str(func.attrs[FLASH_ATTR])).for_target(*_vector_target(target))
        return s_tir.Schedule(flash_attention(spec))


def cpu_rules() -> list[tuple[str, ScheduleRule]]:
    return [("flash-attention", FlashAttention()), ("gemv", Gemv()), ("gemm", Gemm()),
            ("contraction", Contraction()), ("row-reduction", RowReduction()), ("parallel-outer", ParallelOuter())]


def gpu_rules(matmul: bool = True) -> list[tuple[str, ScheduleRule]]:
    """Our GEMV for quantized decode linears (`weight_schedules.QuantGemvGpu`), then dlight's GPU
    rules; Metal drops `Matmul` (TVM 0.27 segfaults inside its Tensorize there)."""
    rules: list[tuple[str, ScheduleRule]] = [("gpu-quant-gemv", QuantGemvGpu())]
    rules += [("dlight.gpu.Matmul", dl.gpu.Matmul())] if matmul else []
    return rules + [("dlight.gpu.GEMV", dl.gpu.GEMV()), ("dlight.gpu.Reduction", dl.gpu.Reduction()),
                    ("dlight.gpu.GeneralReduction", dl.gpu.GeneralReduction()),
                    ("dlight.gpu.Fallback", dl.gpu.Fallback())]


# the first TIR lowering steps, which reject some schedules dlight emits (e.g. its GPU Reduction
# rule on a decode attention-score kernel: "cross-thread reduction ... not the deepest loops")
_CHECKS = (s_tir.transform.CanonicalizeLoop, s_tir.transform.LowerCrossThreadReduction)
DLIGHT = "dlight."  # rule names of TVM's generic rules: these may fail on a function, ours may not
ERROR_ATTR = "rlx.schedule_error"    # an own rule failed here: `check_schedules` raises
SKIPPED_ATTR = "rlx.schedule_skipped"  # the generic rules tried first and why each failed


class ScheduleError(RlxError):
    """One of rlx's own schedule rules failed on a kernel it claimed."""


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _lowering_error(func: tirx.PrimFunc) -> str | None:
    try:
        tvm.transform.Sequential([c() for c in _CHECKS])(tvm.IRModule({"main": func}))
        return None
    except SCHEDULE_ERRORS as e:
        return _why(e)


def _schedule_one(func: tirx.PrimFunc, rules: Sequence[tuple[str, ScheduleRule]], target: Target) -> tirx.PrimFunc:
    """`func` scheduled by the first rule that claims it (returns a schedule). A rule of ours that
    raises, or whose schedule does not lower, marks the function with `ERROR_ATTR`: pinned, never
    a fall-through to a rule that takes anything. dlight's rules may fail (they try any function):
    the next one is tried, each failure recorded in `SKIPPED_ATTR`."""
    skipped: list[str] = []
    for name, rule in rules:
        problem: str | None
        try:
            sch = rule.apply(func, target, False)
        except RULE_ERRORS as e:
            sch, problem = None, _why(e)
        else:
            if sch is None:
                continue
            sch = sch[0] if isinstance(sch, list) else sch
            scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(SCHEDULE_ATTR, name)
            problem = _lowering_error(scheduled)
            if problem is None:
                return scheduled.with_attr(SKIPPED_ATTR, "; ".join(skipped)) if skipped else scheduled
        if not name.startswith(DLIGHT):
            return func.with_attr(ERROR_ATTR, f"rule {name}: {problem}")
        skipped.append(f"{name}: {problem}")
    if "T.call_packed(" in func.script():  # e.g. Relax's sort / topk: TVM's sort library
        func = func.with_attr(SCHEDULE_ATTR, EXTERN)
    return func.with_attr(SKIPPED_ATTR, "; ".join(skipped)) if skipped else func


def apply_schedules(rules: Sequence[tuple[str, ScheduleRule]]) -> tvm.transform.Pass:
    """Schedule every unscheduled PrimFunc with the first rule that applies (run under a target;
    `check_schedules` afterwards raises on a failed rule of ours: a raise inside a pass would
    reach the caller as TVM's RuntimeError)."""

    @tvm.transform.module_pass(opt_level=0, name="RlxApplySchedules")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        target = Target.current(allow_none=False)
        updated = {gv: _schedule_one(func, rules, target) for gv, func in mod.functions_items()
                   if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled")}
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _pass


def _attr_of(mod: tvm.IRModule, attr: str) -> dict[str, str]:
    return {gv.name_hint: str(func.attrs[attr]) for gv, func in mod.functions_items()
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and attr in func.attrs}


def check_schedules(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` if none of our rules failed in it; else a `ScheduleError` naming each kernel and rule."""
    failed = _attr_of(mod, ERROR_ATTR)
    if failed:
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise ScheduleError(f"{len(failed)} kernel(s) failed their rlx schedule rule: {listed}",
                            hint="this is a bug in rlx's schedules (rlx/targets/schedules.py, weight_schedules.py): "
                                 "please report it with the model and target")
    return mod


def schedule_skipped(mod: tvm.IRModule) -> dict[str, str]:
    """PrimFunc name -> the generic rules that failed on it before one applied, and why."""
    return _attr_of(mod, SKIPPED_ATTR)


def schedule_report(mod: tvm.IRModule) -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it ("extern": a runtime library call, nothing to
    schedule; "none": no rule applied)."""
    return {gv.name_hint: str(func.attrs.get(SCHEDULE_ATTR, "none")) if func.attrs else "none"
            for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
