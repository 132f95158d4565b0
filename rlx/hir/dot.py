"""Graphviz DOT drawing of an HIR (render with `dot -Tsvg`)."""

from __future__ import annotations

import json

from rlx.hir.graph import HIR
from rlx.hir.ops import Op

_STYLE: dict[Op, str] = {
    Op.INPUT: 'shape=invhouse, style=filled, fillcolor="#cde8ff"',
    Op.PARAM: 'shape=note, style=filled, fillcolor="#eeeeee"',
    Op.CONST: 'shape=note, style=filled, fillcolor="#f4f4d0"',
}
_DEFAULT = 'shape=box, style="rounded,filled", fillcolor="#ffffff"'


def to_dot(hir: HIR) -> str:
    lines = [f"digraph {json.dumps(hir.name)} {{", "  rankdir=TB; node [fontname=monospace, fontsize=10];"]
    for n in hir.nodes():
        label = f"{n.id}\n{n.op.value} : {n.type}"
        lines.append(f"  {json.dumps(n.id)} [label={json.dumps(label)}, {_STYLE.get(n.op, _DEFAULT)}];")
        lines += [f"  {json.dumps(i)} -> {json.dumps(n.id)};" for i in n.inputs]
    for name, nid in hir.outputs.items():
        out = json.dumps("out:" + name)
        lines.append(f'  {out} [label={json.dumps(name)}, shape=house, style=filled, fillcolor="#d4f7d4"];')
        lines.append(f"  {json.dumps(nid)} -> {out};")
    lines.append("}")
    return "\n".join(lines) + "\n"
