"""What every fusion pass shares: hit / miss counting and the result it reports."""

from __future__ import annotations

from collections.abc import Iterable

from rlx.compiler.graph import HIR
from rlx.compiler.passes import Miss, PassResult


def fusion_result(pattern: str, hir: HIR, hits: int, misses: Iterable[Miss]) -> PassResult:
    """Stats are `hits.<pattern>` and `misses.<pattern>`; misses also list where and why."""
    missed = tuple(misses)
    return PassResult(hir, hits > 0, {f"hits.{pattern}": hits, f"misses.{pattern}": len(missed)}, missed)
