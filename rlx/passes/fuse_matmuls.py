"""Shared-input matmuls -> one matmul over weights concatenated at compile time.

Q/K/V projections of one layer read the same normed hidden state, as do the MLP's gate and up:
one `linear(x, concat(Wq, Wk, Wv))` reads x once and gives the kernel one big GEMM; `slice`s
hand each consumer its part. The concat has only params as inputs, so a backend computes it
once when it lays out the weights. Projections are found by their `role` and grouped by their
`layer` (node meta, `rlx.hir.conventions`), not by weight names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlx.hir import conventions as cv
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Pass, PassResult, register
from rlx.passes.fusion import fusion_result


def _role(hir: HIR, linear: Node, roles: tuple[str, ...]) -> tuple[int | None, str] | None:
    """(layer, role) of a linear over a param weight whose role is one of `roles`."""
    role = cv.role_of(linear)
    if linear.op is not Op.LINEAR or role not in roles or hir.node(linear.inputs[1]).op is not Op.PARAM:
        return None
    return cv.layer_of(linear), role


@dataclass(frozen=True)
class _FuseSharedInput(Pass):
    pattern: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ()

    def _groups(self, hir: HIR, x: str) -> list[list[Node]]:
        """Projections of one layer reading x, in role order, grouped by their weights' type: one
        matmul needs one weight format (a GGUF may store v in another block type than q and k)."""
        by_module: dict[tuple[int | None, str], dict[str, Node]] = {}
        for u in hir.users(x):
            key = _role(hir, u, self.roles)
            if key is not None and u.inputs[0] == x:
                weight_type = str(hir.node(u.inputs[1]).type)
                by_module.setdefault((key[0], weight_type.split("[")[0]), {})[key[1]] = u
        return [[g[r] for r in self.roles if r in g] for g in by_module.values()]

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        hits = 0
        for x in [n.id for n in out.nodes()]:
            if x not in out:  # a linear this loop already replaced
                continue
            for linears in self._groups(out, x):
                if len(linears) < 2:  # nothing to share: e.g. a KV-sharing layer has a q_proj only
                    continue
                self._fuse(out, x, linears)
                hits += 1
        return fusion_result(self.pattern, out, hits, ())

    def _fuse(self, out: HIR, x: str, linears: list[Node]) -> None:
        weights = out.add(Op.CONCAT, [u.inputs[1] for u in linears], {"axis": 0},
                          name=linears[0].id + f".{self.pattern}.w")
        layer = cv.layer_of(linears[0])
        packed = out.add(Op.LINEAR, [x, weights], name=linears[0].id + f".{self.pattern}",
                         meta={} if layer is None else {cv.LAYER: layer})
        start = 0
        for u in linears:
            width = u.type.shape[-1]
            assert isinstance(width, int)
            part = out.add(Op.SLICE, [packed], {"axis": -1, "start": start, "stop": start + width},
                           name=u.id + ".part")
            start += width
            out.replace_uses(u.id, part)
            out.remove(u.id)


@register
@dataclass(frozen=True)
class FuseQKV(_FuseSharedInput):
    name = "fuse-qkv"
    pattern = "qkv"
    roles = ("q", "k", "v")


@register
@dataclass(frozen=True)
class FuseGateUp(_FuseSharedInput):
    name = "fuse-gate-up"
    pattern = "gate-up"
    roles = ("gate", "up")
