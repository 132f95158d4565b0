"""PassManager: runs a pipeline, verifies after each pass, dumps and times it, reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlx.errors import RlxError
from rlx.hir.graph import HIR
from rlx.hir.pass_infra import Miss, Pass, PassError
from rlx.hir.text import print_hir
from rlx.hir.verify import verify


@dataclass(frozen=True)
class PassRecord:
    name: str
    spec: str
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    stats: dict[str, int]
    misses: list[dict[str, str]] = field(default_factory=list)


@dataclass
class PassReport:
    records: list[PassRecord] = field(default_factory=list)

    @property
    def misses(self) -> list[Miss]:
        return [Miss(**m) for r in self.records for m in r.misses]

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [asdict(r) for r in self.records]}

    def lines(self) -> list[str]:
        out = [f"{'pass':<28} {'time ms':>8} {'changed':>7} {'nodes':>13}  stats"]
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
            out.append(f"{r.spec:<28} {r.seconds * 1e3:>8.1f} {str(r.changed).lower():>7} "
                       f"{r.nodes_before:>5} -> {r.nodes_after:<5}  {stats}")
        return out


class PassManager:
    def __init__(self, passes: Sequence[Pass], *, verify_each: bool = True, dump_dir: Path | None = None,
                 assert_clean: bool = False) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.dump_dir = dump_dir
        self.assert_clean = assert_clean

    def _dump(self, index: int, label: str, hir: HIR) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{index:02d}-{label}.hir").write_text(print_hir(hir))

    def run(self, hir: HIR) -> tuple[HIR, PassReport]:
        report = PassReport()
        self._dump(0, "input", hir)
        for index, p in enumerate(self.passes, start=1):
            before = len(hir)
            t0 = time.perf_counter()
            try:
                result = p.run(hir)
                if self.verify_each:
                    verify(result.hir)
            except RlxError as e:
                done = ", ".join(str(q) for q in self.passes[: index - 1]) or "none"
                ran = f"passes that ran before it: {done}"  # the pass's own fix first, said once
                raise PassError(f"pass {p} failed: {e.message}", hint=f"{e.hint} ({ran})" if e.hint else ran) from e
            seconds = time.perf_counter() - t0
            hir = result.hir
            report.records.append(PassRecord(
                p.name, str(p), seconds, result.changed, before, len(hir), dict(result.stats),
                [{"pattern": m.pattern, "node": m.node, "reason": m.reason} for m in result.misses]))
            self._dump(index, p.name, hir)
        if self.assert_clean and report.misses:
            listed = "\n".join(f"  {m.pattern}: %{m.node}: {m.reason}" for m in report.misses)
            raise PassError(f"fusion is not clean: {len(report.misses)} missed pattern(s)\n{listed}",
                            hint="fix the graph or profile, or set [fusion] assert_clean = false")
        return hir, report
