"""Constant folding: evaluate constant subgraphs, and fold scalar work into stored weights.

- any op whose inputs are all `const` (and whose result is small) becomes a `const`;
- `scale(embed(W, ids), s)` -> `embed(W * s, ids)` when nothing else reads W (an untied table);
- `rms_norm(x, W, offset=o)` -> `rms_norm(x, W + o, offset=0)`: Gemma's `(1+w)` is folded into
  the weight. Both use derived params (`stored * scale + shift`), applied when weights load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rlx.hir.graph import HIR, Node, param_key
from rlx.hir.interpreter import IMPLS
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Pass, PassResult, register
from rlx.hir.patterns import Match, Pat, Rule, Var, apply_rules, remove_dead
from rlx.hir.shapes import eval_shape

MAX_FOLDED_ELEMENTS = 1 << 16


def _is_param(node: Node) -> bool:
    return node.op is Op.PARAM


def _derived(hir: HIR, param: str, scale: float, shift: float) -> str:
    """A param reading the same tensor as `param`, then `* scale + shift`."""
    node = hir.node(param)
    name, s0, b0 = param_key(node)
    return hir.param(name, node.type, scale=s0 * scale, shift=b0 * scale + shift, meta=node.meta)


def _fold_embed_scale(hir: HIR, m: Match) -> str | None:
    if len(hir.users(m["table"])) > 1:
        return None  # a tied LM head reads the same table: a scaled copy would double its bytes
    if hir.node(m["table"]).type.is_quantized:
        return None  # scaling blocks would quantize them again (and a GGUF's would lose their bits)
    s = hir.node(m.root).attr("value")
    table = _derived(hir, m["table"], s, 0.0)
    return hir.add(Op.EMBED, [table, m["ids"]], name=m["embed"] + ".folded")


def _fold_norm_offset(hir: HIR, m: Match) -> str:
    root = hir.node(m.root)
    w = _derived(hir, m["w"], 1.0, root.attr("offset"))
    return hir.add(Op.RMSNORM, [m["x"], w], {"eps": root.attr("eps"), "offset": 0.0}, name=root.id + ".folded")


RULES = (
    Rule("embed-scale", Pat(Op.SCALE, Pat(Op.EMBED, Var("table", _is_param), Var("ids"), name="embed")),
         _fold_embed_scale),
    Rule("norm-offset", Pat(Op.RMSNORM, Var("x"), Var("w", _is_param), where=lambda n: n.attr("offset") != 0),
         _fold_norm_offset),
)


def _fold_const_ops(hir: HIR) -> int:
    folded = 0
    values: dict[str, np.ndarray] = {}
    for node in hir.nodes():
        if node.op is Op.CONST:
            values[node.id] = np.asarray(node.attr("value"), node.type.dtype.numpy).reshape(
                eval_shape(node.type.shape, {}))  # a const's shape is static
            continue
        if node.op not in IMPLS or not node.inputs or not all(i in values for i in node.inputs):
            continue
        shape = node.type.shape
        if not all(isinstance(d, int) for d in shape) or math.prod(eval_shape(shape, {})) > MAX_FOLDED_ELEMENTS:
            continue
        value = np.asarray(IMPLS[node.op]([values[i] for i in node.inputs], node.attr_dict, {}),
                           dtype=node.type.dtype.numpy)
        const = hir.add(Op.CONST, attrs={"value": tuple(value.reshape(-1).tolist())}, type=node.type,
                        name=node.id + ".const")
        hir.replace_uses(node.id, const)
        remove_dead(hir, [node.id])
        values[const] = value
        folded += 1
    return folded


@register
@dataclass(frozen=True)
class FoldConstants(Pass):
    name = "fold-constants"
    weights: bool = True  # fold the embedding scale and norm offsets into derived weights

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        stats = {"const-ops": _fold_const_ops(out)}
        if self.weights:
            stats.update(apply_rules(out, RULES))
        return PassResult(out, any(stats.values()), stats)
