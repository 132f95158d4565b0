"""Compile a lowered Relax module for a target: fuse, schedule, then TVM's codegen.

The pipeline is ours in its middle part: Relax legalization and fusion (the same for every
target), then the schedule rules of the target's device (`BACKENDS`: our CPU rules, dlight's
GPU rules; Metal without dlight's Matmul rule, which segfaults there), then TVM's own
per-device dataflow lowering and finalisation (`tvm.relax.backend.<device>.pipeline`). The scheduled
module is kept (`Built.scheduled`) so tests and reports can see which rule scheduled what.

Risky builds (Metal: TVM 0.27 segfaulted the whole process inside dlight's Matmul rule) run in
a child process that exports the library to a file; a crash there is an error here, not a dead
caller.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.relax.backend.gpu_generic import pipeline as gpu_pipeline
from tvm.s_tir.dlight.base import ScheduleRule

import rlx.interrupts as interrupts
from rlx.errors import RlxError
from rlx.hir.graph import HIR
from rlx.hir.serialize import hir_from_dict, hir_to_dict
from rlx.targets.presets import ResolvedTarget, resolve_target
from rlx.targets.schedules import apply_schedules, check_schedules, cpu_rules, gpu_rules, schedule_report

_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b")  # a traceback's last word


class BuildError(RlxError):
    """TVM could not compile the module for the target."""


@dataclass(frozen=True)
class Backend:
    """What differs per device: schedule rules, TVM's backend module, and whether to isolate."""

    rules: Callable[[], list[tuple[str, ScheduleRule]]]
    tvm_backend: ModuleType
    isolate: bool = False


BACKENDS: dict[str, Backend] = {
    "cpu": Backend(cpu_rules, cpu_pipeline),
    "cuda": Backend(gpu_rules, cuda_pipeline),
    "metal": Backend(lambda: gpu_rules(matmul=False), gpu_pipeline, isolate=True),
}

_FUSION = (relax.transform.LegalizeOps, relax.transform.AnnotateTIROpPattern, relax.transform.FoldConstant,
           relax.transform.FuseOps, relax.transform.FuseTIR)


@dataclass
class Built:
    executable: relax.VMExecutable
    scheduled: tvm.IRModule
    target: ResolvedTarget
    seconds: float

    @property
    def schedules(self) -> dict[str, str]:
        return schedule_report(self.scheduled)


def _resolve(target: str | ResolvedTarget) -> ResolvedTarget:
    return resolve_target(target) if isinstance(target, str) else target


def schedule_module(mod: tvm.IRModule, target: str | ResolvedTarget) -> tvm.IRModule:
    """Legalize, fuse and schedule: the module every PrimFunc of which has its schedule (a
    `schedules.ScheduleError` if one of rlx's own rules failed on a kernel)."""
    resolved = _resolve(target)
    be = BACKENDS[resolved.device]
    passes = [*be.tvm_backend.library_dispatch_passes(resolved.target), *(p() for p in _FUSION),
              apply_schedules(be.rules())]
    with resolved.target:
        return check_schedules(tvm.transform.Sequential(passes)(mod))


def _finish_pipeline(resolved: ResolvedTarget) -> tvm.transform.Pass:
    be = BACKENDS[resolved.device].tvm_backend
    return tvm.transform.Sequential([*be.dataflow_lower_passes(resolved.target),
                                     *be.finalize_passes(resolved.target)])


def _pass_context(opt_level: int | None) -> tvm.transform.PassContext:
    """`[backend.<target>] opt_level`: TVM's own meaning (passes above the level are skipped);
    None keeps TVM's default (2)."""
    return tvm.transform.PassContext() if opt_level is None else tvm.transform.PassContext(opt_level=opt_level)


def _compile(mod: tvm.IRModule, resolved: ResolvedTarget, opt_level: int | None) -> tuple[Any, tvm.IRModule]:
    with _pass_context(opt_level):
        scheduled = schedule_module(mod, resolved)
        return tvm.compile(scheduled, target=resolved.target, relax_pipeline=_finish_pipeline(resolved)), scheduled


def build(mod: tvm.IRModule, target: str | ResolvedTarget, *, opt_level: int | None = None) -> Built:
    """Compile in this process (for devices not marked `isolate`)."""
    resolved = _resolve(target)
    if BACKENDS[resolved.device].isolate:
        raise BuildError(f"{resolved.name} builds can crash the process; use build_isolated()",
                         hint="use build_isolated() for this target")
    t0 = time.perf_counter()
    try:
        ex, scheduled = _compile(mod, resolved, opt_level)
    except (RuntimeError, ValueError) as e:
        interrupts.check()  # TVM turns a Ctrl-C in a Python pass into its own error: it is an interrupt
        raise BuildError(f"TVM failed to compile for {resolved.name}: {str(e).splitlines()[0]}",
                         hint="check the error; a smaller --max-seq or another target may work") from e
    return Built(ex, scheduled, resolved, time.perf_counter() - t0)


def build_isolated(graphs: Mapping[str, HIR], target: str, out: Path, *, timeout: float = 1800,
                   opt_level: int | None = None) -> Path:
    """Lower and compile `graphs` (function name -> HIR) in a child process and export the library
    to `out` (`.tar` for cross targets); returns `out`. A crash or timeout of the child raises
    `BuildError`. The child gets the HIR (JSON), not the IRModule: TVM 0.27's `save_json`
    itself segfaulted on our lowered module."""
    resolve_target(target)  # a bad name fails here, not in the child
    with tempfile.TemporaryDirectory(prefix="rlx-build-") as tmp:
        src = Path(tmp) / "graphs.json"
        src.write_text(json.dumps({name: hir_to_dict(hir) for name, hir in graphs.items()}))
        cmd = [sys.executable, "-m", "rlx.targets.build", str(src), target, str(out), str(opt_level)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BuildError(f"{target} build timed out after {timeout:.0f} s",
                             hint="try again on a less loaded machine") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        exception = next((ln for ln in reversed(lines) if _EXCEPTION_LINE.match(ln)), lines[-1] if lines else "")
        why = next((ln for ln in lines if "Segfault" in ln), exception)
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise BuildError(f"{target} build failed in its child process ({how}): {why.strip()}",
                         hint="the error is TVM's; compile the other targets on their own")
    return out


def _child_main(argv: list[str]) -> int:
    """`python -m rlx.targets.build GRAPHS.json TARGET OUT OPT_LEVEL|None`: the child side of
    build_isolated."""
    from rlx.targets.lower import lower_for

    src, target, out, level = argv
    graphs = {name: hir_from_dict(d) for name, d in json.loads(Path(src).read_text()).items()}
    resolved = resolve_target(target)
    ex, _ = _compile(lower_for(graphs, resolved).mod, resolved, None if level == "None" else int(level))
    ex.export_library(out)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
