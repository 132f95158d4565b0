"""JSON form of the HIR (for artifacts and tools); round-trips exactly, meta included."""

from __future__ import annotations

import json
from typing import Any

from rlx.errors import HIRError
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.tensor_type import TensorType
from rlx.hir.text import _from_json, _to_json

FORMAT_VERSION = 1


def hir_to_dict(hir: HIR) -> dict[str, Any]:
    return {
        "format": "rlx-hir",
        "version": FORMAT_VERSION,
        "name": hir.name,
        "nodes": [
            {"id": n.id, "op": n.op.value, "inputs": list(n.inputs), "type": str(n.type),
             "attrs": {k: _to_json(v) for k, v in n.attrs}, "meta": n.meta}
            for n in hir.nodes()
        ],
        "outputs": hir.outputs,
        "meta": hir.meta,
    }


def hir_from_dict(data: dict[str, Any]) -> HIR:
    if data.get("format") != "rlx-hir" or data.get("version") != FORMAT_VERSION:
        raise HIRError(f"not an rlx-hir v{FORMAT_VERSION} document (format={data.get('format')!r}, "
                       f"version={data.get('version')!r})", hint="write it with rlx.hir.serialize.dumps")
    hir = HIR(data["name"])
    hir.meta = dict(data.get("meta", {}))
    try:
        for n in data["nodes"]:
            attrs = tuple(sorted((k, _from_json(v)) for k, v in n["attrs"].items()))
            hir.insert_raw(Node(n["id"], Op(n["op"]), tuple(n["inputs"]), TensorType.parse(n["type"]), attrs,
                                dict(n.get("meta", {}))))
    except (KeyError, ValueError) as e:
        raise HIRError(f"bad HIR JSON node: {e}", hint="write it with rlx.hir.serialize.dumps") from None
    for name, nid in data["outputs"].items():
        hir.raw_set_output(name, nid)
    return hir


def dumps(hir: HIR) -> str:
    return json.dumps(hir_to_dict(hir), indent=1)


def loads(text: str) -> HIR:
    return hir_from_dict(json.loads(text))
