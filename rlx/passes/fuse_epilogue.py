"""Matmul + elementwise epilogue -> `linear_epilogue`, and the final softcap into the LM head.

A chain of single-use elementwise ops after a linear (residual add, scale, softcap, gelu)
runs on the matmul's output tile instead of a round trip through memory. `fuse-lm-head-softcap`
is the one case the report tracks by itself: the Gemma 2/4 final softcap on the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Miss, Pass, PassResult, register
from rlx.passes.fusion import fusion_result


def _step(node: Node, chain_value: str) -> tuple[str, str | None] | None:
    """(step text, extra operand) for an elementwise op that reads `chain_value`, else None."""
    if node.op is Op.SCALE:
        return f"scale={node.attr('value')!r}", None
    if node.op is Op.SOFTCAP:
        return f"softcap={node.attr('cap')!r}", None
    if node.op is Op.GELU_TANH:
        return "gelu_tanh", None
    if node.op in (Op.ADD, Op.MUL) and node.inputs.count(chain_value) == 1:
        other = node.inputs[1] if node.inputs[0] == chain_value else node.inputs[0]
        return node.op.value, other
    return None


def _fuse_from(hir: HIR, linear: Node, max_steps: int) -> bool:
    steps: list[str] = []
    operands: list[str] = []
    tail = linear.id
    chain = [linear.id]
    while len(steps) < max_steps and tail not in hir.outputs.values():
        users = hir.users(tail)
        if len(users) != 1:
            break
        step = _step(users[0], tail)
        if step is None or (step[1] is not None and len(operands) >= 4):
            break
        steps.append(step[0])
        if step[1] is not None:
            operands.append(step[1])
        tail = users[0].id
        chain.append(tail)
    if not steps:
        return False
    fused = hir.add(Op.LINEAR_EPILOGUE, [*linear.inputs, *operands], {"steps": tuple(steps)},
                    name=linear.id + ".epilogue")
    hir.replace_uses(tail, fused)
    for nid in reversed(chain):
        hir.remove(nid)
    return True


@register
@dataclass(frozen=True)
class FuseEpilogue(Pass):
    name = "fuse-epilogue"
    max_steps: int = 4

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        hits = sum(_fuse_from(out, out.node(n.id), self.max_steps) for n in out.nodes_of(Op.LINEAR))
        return fusion_result("epilogue", out, hits, ())


@register
@dataclass(frozen=True)
class FuseLMHeadSoftcap(Pass):
    name = "fuse-lm-head-softcap"

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        hits, misses = 0, []
        for name, nid in hir.outputs.items():
            cap = out.node(nid)
            if cap.op is not Op.SOFTCAP:
                continue
            head = out.node(cap.inputs[0])
            if head.op is Op.LINEAR and len(out.users(head.id)) == 1:
                hits += _fuse_from(out, head, 1)
            else:
                misses.append(Miss("lm-head-softcap", cap.id, f"softcap on output {name} is not fed by a linear"))
        return fusion_result("lm-head-softcap", out, hits, misses)
