"""Dead-code elimination: drop every node no output depends on (graph inputs stay)."""

from __future__ import annotations

from dataclasses import dataclass

from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Pass, PassResult, register


@register
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        live: set[str] = set()
        stack = list(out.outputs.values())
        while stack:
            nid = stack.pop()
            if nid not in live:
                live.add(nid)
                stack.extend(out.node(nid).inputs)
        dead = [n.id for n in reversed(out.nodes()) if n.id not in live and n.op is not Op.INPUT]
        for nid in dead:
            out.remove(nid)  # reverse topological order: its users are gone already
        removed = len(hir) - len(out)
        return PassResult(out, removed > 0, {"removed": removed})
