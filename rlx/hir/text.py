"""Text form of the HIR; `parse(print(h)) == h` exactly.

    hir main {
      %x = input() {"name": "input_ids"} : i64[BATCH, SEQ]
      %h = embed(%p.embed_tokens.weight, %x) : f32[BATCH, SEQ, 640]
      return logits=%h
    }

Attr blocks are JSON objects (floats print with repr, so they round-trip bit-exactly). A graph
with `meta` prints it as a JSON object on the header line: `hir main {"bounds": {"SEQ": 512}} {`;
a node's meta (`rlx.hir.conventions`: its layer, a linear's role) follows its type:
`%l3.q = linear(%x, %w) : f32[1, SEQ, 1024] meta {"layer": 3, "role": "q"}`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rlx.errors import HIRError
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.tensor_type import TensorType

_NODE = re.compile(r"^%(?P<id>\S+) = (?P<op>\w+)\((?P<args>[^)]*)\)(?: (?P<attrs>\{.*?\}))? : "
                   r"(?P<type>[^{]+?)(?: meta (?P<meta>\{.*\}))?$")
_SYNTAX = "the text form is `hir NAME {`, `%id = op(%a, %b) {attrs} : type`, `return name=%id`, `}`"
_HEADER = re.compile(r"^hir (?P<name>\S+)(?: (?P<meta>\{.*\}))? \{$")


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def format_node(node: Node) -> str:
    args = ", ".join("%" + i for i in node.inputs)
    attrs = f" {json.dumps({k: _to_json(v) for k, v in node.attrs})}" if node.attrs else ""
    meta = f" meta {json.dumps(node.meta, sort_keys=True)}" if node.meta else ""
    return f"%{node.id} = {node.op.value}({args}){attrs} : {node.type}{meta}"


def print_hir(hir: HIR) -> str:
    meta = f" {json.dumps(hir.meta)}" if hir.meta else ""
    lines = [f"hir {hir.name}{meta} {{"]
    lines += ["  " + format_node(n) for n in hir.nodes()]
    outs = ", ".join(f"{name}=%{nid}" for name, nid in hir.outputs.items())
    lines += [f"  return {outs}", "}"]
    return "\n".join(lines) + "\n"


def parse_hir(text: str) -> HIR:
    """Parse the text form. Nodes keep their ids; types are taken as written (verify() checks them)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) < 2 or not (m := _HEADER.match(lines[0])) or lines[-1] != "}":
        raise HIRError("parse: expected 'hir NAME {' ... '}'", hint=_SYNTAX)
    hir = HIR(m.group("name"))
    if m.group("meta"):
        try:
            hir.meta = json.loads(m.group("meta"))
        except json.JSONDecodeError as e:
            raise HIRError(f"parse line 1: bad graph meta: {e}", hint=_SYNTAX) from None
    for lineno, line in enumerate(lines[1:-1], start=2):
        if line.startswith("return"):
            for item in filter(None, (s.strip() for s in line[len("return"):].split(","))):
                name, _, ref = item.partition("=%")
                if not ref:
                    raise HIRError(f"parse line {lineno}: bad output {item!r}, expected name=%id", hint=_SYNTAX)
                hir.raw_set_output(name, ref)
            continue
        nm = _NODE.match(line)
        if not nm:
            raise HIRError(f"parse line {lineno}: cannot read {line!r}", hint=_SYNTAX)
        try:
            op = Op(nm.group("op"))
            attrs = json.loads(nm.group("attrs")) if nm.group("attrs") else {}
            ttype = TensorType.parse(nm.group("type"))
            meta = json.loads(nm.group("meta")) if nm.group("meta") else {}
        except (ValueError, json.JSONDecodeError) as e:
            raise HIRError(f"parse line {lineno}: {e}", hint=_SYNTAX) from None
        inputs = tuple(a.strip()[1:] for a in nm.group("args").split(",") if a.strip())
        for i in inputs:
            if i not in hir:
                raise HIRError(f"parse line {lineno}: %{i} used before it is defined",
                               hint="define each node before the nodes that read it")
        node_attrs = tuple(sorted((k, _from_json(v)) for k, v in attrs.items()))
        hir.insert_raw(Node(nm.group("id"), op, inputs, ttype, node_attrs, meta))
    return hir
