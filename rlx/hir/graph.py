"""The HIR graph: a typed SSA dataflow graph kept in a networkx DiGraph.

Passes and frontends go through this API only; networkx stays an implementation detail of this
module. Node ids are readable strings (`l3.attn.q`) so dumps and error messages point at the
model, not at a counter.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from rlx.errors import HIRError
from rlx.hir.ops import OPS, Op, TypeRuleError, complete_attrs
from rlx.hir.tensor_type import TensorType


@dataclass(frozen=True)
class Node:
    """One SSA value. `meta` holds plain JSON values (the conventions of `rlx.hir.conventions`:
    layer, role); it is printed by the text form but is not part of equality."""

    id: str
    op: Op
    inputs: tuple[str, ...]
    type: TensorType
    attrs: tuple[tuple[str, Any], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def attr(self, name: str) -> Any:
        return dict(self.attrs)[name]

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)


def param_key(node: Node) -> tuple[str, float, float]:
    """What a PARAM loads: (stored tensor name, scale, shift)."""
    return node.attr("name"), node.attr("scale"), node.attr("shift")


class HIR:
    """An HIR function: named inputs, nodes in dataflow order, named outputs.

    `meta` holds graph-level facts later stages need (e.g. `{"bounds": {"SEQ": 512}}` from
    specialization, for memory planning). Unlike node meta it is serialised by the text and
    JSON forms and is part of equality, so it must hold plain JSON values.
    """

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.meta: dict[str, Any] = {}
        self._g: nx.DiGraph = nx.DiGraph()
        self._outputs: dict[str, str] = {}
        self._counter = 0

    # ---- construction ----
    def add(
        self,
        op: Op,
        inputs: Sequence[str] = (),
        attrs: Mapping[str, Any] | None = None,
        *,
        type: TensorType | None = None,
        name: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> str:
        """Append a node; its type is inferred from the op's rule unless the op declares it."""
        node_id = self._fresh(name or op.value)
        for i in inputs:
            if i not in self._g:
                raise HIRError(f"{node_id}: input %{i} is not defined", hint="add a node after the nodes it reads")
        try:
            full = complete_attrs(op, attrs or {})
            inferred = OPS[op].infer([self.node(i).type for i in inputs], full)
        except TypeRuleError as e:
            raise HIRError(f"{node_id} ({op.value}): {e}",
                           hint="check the op's inputs and attrs against rlx.hir.ops.OPS") from None
        out_type = type if inferred is None else inferred
        if out_type is None:
            raise HIRError(f"{node_id}: op {op.value} needs an explicit type",
                           hint="give type= for input / param / const nodes")
        node = Node(node_id, op, tuple(inputs), out_type, tuple(sorted(full.items())), dict(meta or {}))
        self._insert(node)
        return node_id

    def input(self, name: str, type: TensorType) -> str:
        return self.add(Op.INPUT, attrs={"name": name}, type=type, name=name)

    def param(self, weight: str, type: TensorType, *, scale: float = 1.0, shift: float = 0.0,
              meta: Mapping[str, Any] | None = None) -> str:
        """A weight (`stored * scale + shift`); one node per derivation, reused if asked again."""
        for n in self.nodes_of(Op.PARAM):
            if param_key(n) == (weight, scale, shift):
                return n.id
        derived = "" if (scale, shift) == (1.0, 0.0) else ".derived"
        return self.add(Op.PARAM, attrs={"name": weight, "scale": scale, "shift": shift}, type=type,
                        name="p." + weight + derived, meta=meta)

    def set_output(self, name: str, node_id: str) -> None:
        if node_id not in self._g:
            raise HIRError(f"output {name}: %{node_id} is not defined", hint="set an output to a node the graph holds")
        self._outputs[name] = node_id

    def _fresh(self, base: str) -> str:
        if base not in self._g:
            return base
        while True:
            self._counter += 1
            candidate = f"{base}.{self._counter}"
            if candidate not in self._g:
                return candidate

    def _insert(self, node: Node) -> None:
        self._g.add_node(node.id, node=node)
        for pos, src in enumerate(node.inputs):
            # a node may use the same value twice: keep every position on one edge
            if self._g.has_edge(src, node.id):
                self._g.edges[src, node.id]["pos"].append(pos)
            else:
                self._g.add_edge(src, node.id, pos=[pos])

    # ---- queries ----
    def node(self, node_id: str) -> Node:
        try:
            return self._g.nodes[node_id]["node"]
        except KeyError:
            raise HIRError(f"no node %{node_id}", hint="use a node id the graph holds (print_hir lists them)") from None

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def nodes(self) -> list[Node]:
        """Nodes in a deterministic topological order (insertion order breaks ties)."""
        order = {n: i for i, n in enumerate(self._g.nodes)}
        return [self.node(n) for n in nx.lexicographical_topological_sort(self._g, key=order.__getitem__)]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes())

    def nodes_of(self, op: Op) -> list[Node]:
        return [self._g.nodes[n]["node"] for n in self._g.nodes if self._g.nodes[n]["node"].op is op]

    def users(self, node_id: str) -> list[Node]:
        return [self.node(u) for u in self._g.successors(node_id)]

    @property
    def inputs(self) -> dict[str, Node]:
        return {n.attr("name"): n for n in self.nodes_of(Op.INPUT)}

    @property
    def params(self) -> dict[str, Node]:
        """Params by node id (one stored tensor may back several derived params)."""
        return {n.id: n for n in self.nodes_of(Op.PARAM)}

    @property
    def outputs(self) -> dict[str, str]:
        return dict(self._outputs)

    def is_acyclic(self) -> bool:
        return nx.is_directed_acyclic_graph(self._g)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._g.nodes:
            op = self._g.nodes[n]["node"].op.value
            counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))

    # ---- rewriting ----
    def replace_node(self, node: Node) -> None:
        """Swap a node for one with the same id (new op, inputs, attrs or type)."""
        self.remove(node.id, force=True)
        self._insert(node)

    def replace_uses(self, old: str, new: str) -> None:
        """Point every use of `old` (outputs included) at `new`. A node without meta that takes
        another's place inherits its meta (layer, role: `rlx.hir.conventions`), so a rewrite
        keeps what the frontend recorded about the value it replaces."""
        replacement = self.node(new)
        if not replacement.meta:
            replacement.meta.update(copy.deepcopy(self.node(old).meta))
        for user in self.users(old):
            self.replace_node(
                Node(user.id, user.op, tuple(new if i == old else i for i in user.inputs), user.type,
                     user.attrs, user.meta)
            )
        for name, nid in self._outputs.items():
            if nid == old:
                self._outputs[name] = new

    def remove(self, node_id: str, *, force: bool = False) -> None:
        if not force and (any(True for _ in self._g.successors(node_id)) or node_id in self._outputs.values()):
            raise HIRError(f"cannot remove %{node_id}: it is still used",
                           hint="replace its uses first (replace_uses), or remove with force=True")
        edges_out = [(node_id, s, d) for s, d in self._g.succ[node_id].items()] if force else []
        self._g.remove_node(node_id)
        for src, dst, data in edges_out:  # keep users' edges so replace_node can re-add the node
            self._g.add_edge(src, dst, **data)

    def copy(self) -> HIR:
        out = HIR(self.name)
        out._g = self._g.copy()
        out._outputs = dict(self._outputs)
        out._counter = self._counter
        out.meta = copy.deepcopy(self.meta)
        return out

    # ---- equality (structure and graph meta, not node meta) ----
    def signature(self) -> tuple[Any, ...]:
        return (self.name, tuple(sorted((n.id, n.op, n.inputs, n.type, n.attrs) for n in self.nodes())),
                tuple(self._outputs.items()), json.dumps(self.meta, sort_keys=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HIR) and self.signature() == other.signature()

    def __hash__(self) -> int:
        return hash(self.signature())

    # unchecked insert for parsers and tests that must build broken graphs
    def insert_raw(self, node: Node) -> None:
        self._insert(node)

    def raw_set_output(self, name: str, node_id: str) -> None:
        self._outputs[name] = node_id


def weight_only(hir: HIR) -> set[str]:
    """Nodes computed from params alone (at least one param, no graph input): load-time work for
    a compiled module, once-per-interpreter work for the reference."""
    params, inputs = set(), set()
    for n in hir.nodes():
        params.update([n.id] if n.op is Op.PARAM or any(i in params for i in n.inputs) else [])
        inputs.update([n.id] if n.op is Op.INPUT or any(i in inputs for i in n.inputs) else [])
    return params - inputs
