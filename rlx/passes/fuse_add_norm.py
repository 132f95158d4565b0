"""Residual add + RMSNorm -> `add_rms_norm`; the sum stays available as `result{index=1}`.

A decoder layer reads the residual stream twice (norm, then the next add): the fused op
computes both in one pass over the data. An RMSNorm fed by an add that cannot fuse is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Miss, Pass, PassResult, register
from rlx.passes.fusion import fusion_result


@register
@dataclass(frozen=True)
class FuseAddNorm(Pass):
    name = "fuse-add-norm"

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        hits, misses = 0, []
        for stale in out.nodes_of(Op.RMSNORM):
            norm = out.node(stale.id)
            add = out.node(norm.inputs[0])
            if add.op is not Op.ADD:
                continue
            a, b = (out.node(i).type for i in add.inputs)
            if a != b or a != add.type:
                misses.append(Miss("add-norm", norm.id, f"add of {a} and {b} broadcasts"))
                continue
            fused = out.add(Op.ADD_RMSNORM, [*add.inputs, *norm.inputs[1:]], norm.attr_dict, name=norm.id + ".fused")
            out.replace_uses(norm.id, fused)
            out.remove(norm.id)
            if out.users(add.id) or add.id in out.outputs.values():
                out.replace_uses(add.id, out.add(Op.RESULT, [fused], {"index": 1}, name=add.id + ".sum"))
            out.remove(add.id)
            hits += 1
        return fusion_result("add-norm", out, hits, misses)
