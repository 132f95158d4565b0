"""Common-subexpression elimination: one node per (op, inputs, attrs, type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Pass, PassResult, register

_NEVER = (Op.INPUT,)


@register
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name = "cse"

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        seen: dict[tuple[Any, ...], str] = {}
        merged = 0
        for stale in out.nodes():  # topological: inputs are already canonical when a node is keyed
            node = out.node(stale.id)
            if node.op in _NEVER:
                continue
            key = (node.op, node.inputs, node.attrs, node.type)
            first = seen.setdefault(key, node.id)
            if first != node.id:
                out.replace_uses(node.id, first)
                out.remove(node.id)
                merged += 1
        return PassResult(out, merged > 0, {"merged": merged})
