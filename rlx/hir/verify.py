"""HIR verifier: the invariants every pass must keep. Each rule has a name for error messages."""

from __future__ import annotations

from collections.abc import Callable

from rlx.errors import HIRError
from rlx.hir.graph import HIR, Node, param_key
from rlx.hir.ops import MULTI_RESULT, OPS, Op, TypeRuleError, complete_attrs
from rlx.hir.shapes import SymDim

# who breaks a rule: a pass, or a user's patch_graph / patch_flow hook or stage
_FIX = "a pass or a patch_graph hook built an invalid graph: run the passes one by one (--passes) to find which"


def _rule_acyclic(hir: HIR) -> None:
    if not hir.is_acyclic():
        raise HIRError("acyclic: the graph has a cycle", hint=_FIX)


def _rule_has_outputs(hir: HIR) -> None:
    if not hir.outputs:
        raise HIRError("outputs: the graph has no outputs", hint=_FIX)
    for name, nid in hir.outputs.items():
        if nid not in hir:
            raise HIRError(f"outputs: output {name} refers to undefined %{nid}", hint=_FIX)


def _rule_unique_names(hir: HIR) -> None:
    keys: dict[Op, Callable[[Node], object]] = {Op.INPUT: lambda n: n.attr("name"), Op.PARAM: param_key}
    for op, key in keys.items():
        seen: set[object] = set()
        for n in hir.nodes_of(op):
            k = key(n)
            if k in seen:
                raise HIRError(f"unique-names: two {op.value} nodes load {k!r}", hint=_FIX)
            seen.add(k)


def _check_node(hir: HIR, node: Node) -> None:
    spec = OPS[node.op]
    lo, hi = spec.arity
    where = f"%{node.id} ({node.op.value})"
    for i in node.inputs:
        if i not in hir:
            raise HIRError(f"defined-inputs: {where} uses undefined %{i}", hint=_FIX)
    if not lo <= len(node.inputs) <= hi:
        raise HIRError(f"arity: {where} takes {lo}..{hi} inputs, has {len(node.inputs)}", hint=_FIX)
    try:
        attrs = complete_attrs(node.op, node.attr_dict)
    except TypeRuleError as e:
        raise HIRError(f"attrs: {where}: {e}", hint=_FIX) from None
    if attrs != node.attr_dict:
        raise HIRError(f"attrs: {where} does not carry every attr (expected {sorted(attrs)})", hint=_FIX)
    try:
        inferred = spec.infer([hir.node(i).type for i in node.inputs], attrs)
    except TypeRuleError as e:
        raise HIRError(f"types: {where}: {e}", hint=_FIX) from None
    if inferred is not None and inferred != node.type:
        raise HIRError(f"types: {where} is declared {node.type} but its inputs give {inferred}", hint=_FIX)
    if node.op is Op.RESULT and hir.node(node.inputs[0]).op.value not in MULTI_RESULT:
        raise HIRError(f"result: {where} reads {hir.node(node.inputs[0]).op.value}, which has one result", hint=_FIX)
    if node.op is Op.CONST:
        numel = 1
        for d in node.type.shape:
            if isinstance(d, SymDim):
                raise HIRError(f"const: {where} must have a static shape", hint=_FIX)
            numel *= d
        if numel != len(node.attr("value")):
            raise HIRError(f"const: {where} holds {len(node.attr('value'))} values for shape {node.type}", hint=_FIX)


def _rule_nodes(hir: HIR) -> None:
    for node in hir.nodes():
        _check_node(hir, node)


def _rule_quantized(hir: HIR) -> None:
    """A quantized value is a stored weight: only ops that read blocks take it (OpSpec
    .quantized_inputs, e.g. a linear's weight), and it is never a graph output."""
    for node in hir.nodes():
        for pos, i in enumerate(node.inputs):
            if hir.node(i).type.is_quantized and pos not in OPS[node.op].quantized_inputs:
                raise HIRError(f"quantized: %{node.id} ({node.op.value}) reads quantized %{i} as input {pos}",
                               hint=_FIX)
    for name, nid in hir.outputs.items():
        if nid in hir and hir.node(nid).type.is_quantized:
            raise HIRError(f"quantized: output {name} is quantized %{nid}", hint=_FIX)


RULES: dict[str, Callable[[HIR], None]] = {
    "acyclic": _rule_acyclic,
    "outputs": _rule_has_outputs,
    "unique-names": _rule_unique_names,
    "nodes": _rule_nodes,
    "quantized": _rule_quantized,
}


def verify(hir: HIR) -> HIR:
    """Raise HIRError naming the first broken rule; return the graph for chaining."""
    for rule in RULES.values():
        rule(hir)
    return hir
