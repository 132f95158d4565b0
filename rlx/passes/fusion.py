"""What every fusion pass shares: hit / miss counting and the result it reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Miss, Pass, PassResult
from rlx.hir.patterns import Rule, apply_rules


def fusion_result(pattern: str, hir: HIR, hits: int, misses: Iterable[Miss]) -> PassResult:
    """Stats are `hits.<pattern>` and `misses.<pattern>`; misses also list where and why."""
    missed = tuple(misses)
    return PassResult(hir, hits > 0, {f"hits.{pattern}": hits, f"misses.{pattern}": len(missed)}, missed)


@dataclass(frozen=True)
class RuleFusion(Pass):
    """A fusion pass made of rewrite rules; every `anchor` op left afterwards is a miss."""

    pattern: ClassVar[str] = ""
    rules: ClassVar[tuple[Rule, ...]] = ()
    anchor: ClassVar[Op]
    miss_reason: ClassVar[str] = ""

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        hits = sum(apply_rules(out, self.rules).values())
        misses = [Miss(self.pattern, n.id, self.miss_reason) for n in out.nodes_of(self.anchor)]
        return fusion_result(self.pattern, out, hits, misses)
