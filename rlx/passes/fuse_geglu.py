"""`gelu_tanh(gate) * up` -> `geglu`; over the packed gate|up matmul it reads one tensor.

After `fuse-gate-up`, gate and up are the two halves of one linear: `geglu(packed)` splits it
inside the kernel. Any gelu_tanh left over is a miss.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.pass_infra import register
from rlx.hir.patterns import Match, Pat, Rule, Var
from rlx.passes.fusion import RuleFusion


def _halves_of_one(hir: HIR, gate: str, up: str) -> str | None:
    """The packed value when gate and up are its [0:I] and [I:2I] slices on the last axis."""
    g, u = hir.node(gate), hir.node(up)
    if g.op is not Op.SLICE or u.op is not Op.SLICE or g.inputs != u.inputs:
        return None
    packed = hir.node(g.inputs[0])
    width = packed.type.shape[-1]
    half = g.type.shape[-1]
    ok = (g.attr("axis") in (-1, packed.type.rank - 1) and u.attr("axis") == g.attr("axis")
          and isinstance(width, int) and isinstance(half, int) and width == 2 * half
          and (g.attr("start"), g.attr("stop"), u.attr("start"), u.attr("stop")) == (0, half, half, width))
    return packed.id if ok else None


def _fuse(hir: HIR, m: Match) -> str:
    packed = _halves_of_one(hir, m["gate"], m["up"])
    ins = [packed] if packed is not None else [m["gate"], m["up"]]
    return hir.add(Op.GEGLU, ins, name=m.root + ".geglu")


RULES = (Rule("geglu", Pat(Op.MUL, Pat(Op.GELU_TANH, Var("gate")), Var("up"), commutative=True), _fuse),)


@register
@dataclass(frozen=True)
class FuseGeGLU(RuleFusion):
    name = "fuse-geglu"
    pattern = "geglu"
    rules = RULES
    anchor = Op.GELU_TANH
    miss_reason = "gelu_tanh not multiplied by an up projection"
