"""What every schedule rule module needs (`schedules.py`, `weight_schedules.py`): the errors a
TVM 0.27 schedule primitive raises, and the few helpers around them."""

from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir, tirx

# TVM 0.27 raises builtin exception types (ScheduleError is a RuntimeError)
SCHEDULE_ERRORS = (RuntimeError, ValueError)
# a rule that does not understand a function may also fail an internal `assert` (dlight's GEMV
# analysis does on a quantized weight's byte reads): that rule does not apply, the next one may
RULE_ERRORS = (*SCHEDULE_ERRORS, AssertionError)


def static_extent(extent: tirx.PrimExpr) -> int | None:
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def root_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    """The blocks under the root block; none for a function written without one (a kernel
    generated scheduled, like the flash attention ones): no rule of ours claims such a function."""
    body = sch.mod["main"].body
    if not isinstance(body, s_tir.SBlockRealize):
        return []
    return list(sch.get_child_blocks(sch.get_sblock(body.block.name_hint)))


def attempt(sch: s_tir.Schedule, step: Callable[[], object]) -> bool:
    """Run an optional schedule step; a primitive that refuses leaves the schedule unchanged."""
    try:
        step()
        return True
    except SCHEDULE_ERRORS:
        return False
