"""A small declarative pattern matcher for HIR rewrites.

    ATTN = Pat(Op.SOFTMAX, Pat(Op.CAUSAL_MASK, Opt(Op.SOFTCAP, Pat(Op.SCALE, ...)), Var("pos")))

`Pat` matches a node by op (and an optional predicate) with sub-patterns for its inputs; `Var`
binds any value; `Opt` matches an optional unary op. Interior nodes must have a single user, so
a rewrite can replace the whole match without duplicating work, unless marked `shared` (views
such as transposes, which cost nothing to keep for their other users). Rules are named; `apply_rules`
runs them to a fixpoint and counts hits per rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op

Predicate = Callable[[Node], bool]


@dataclass(frozen=True)
class Var:
    name: str
    where: Predicate | None = None


@dataclass(frozen=True)
class Pat:
    op: Op | tuple[Op, ...]
    args: tuple[Pattern, ...] = ()
    name: str | None = None
    where: Predicate | None = None
    commutative: bool = False
    shared: bool = False  # may have other users (cheap views, e.g. a transpose that CSE merged)

    def __init__(self, op: Op | tuple[Op, ...], *args: Pattern, name: str | None = None,
                 where: Predicate | None = None, commutative: bool = False, shared: bool = False) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", tuple(args))
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "commutative", commutative)
        object.__setattr__(self, "shared", shared)


@dataclass(frozen=True)
class Opt:
    """`op(inner)` or just `inner`; when present the op node is bound to `name`."""

    op: Op
    inner: Pattern
    name: str
    shared: bool = False


Pattern = Var | Pat | Opt


@dataclass
class Match:
    root: str
    bindings: dict[str, str] = field(default_factory=dict)
    interior: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> str:
        return self.bindings[name]

    def get(self, name: str) -> str | None:
        return self.bindings.get(name)


def _match(hir: HIR, pat: Pattern, nid: str, m: Match, is_root: bool) -> bool:
    node = hir.node(nid)
    if isinstance(pat, Var):
        if pat.where is not None and not pat.where(node):
            return False
        bound = m.bindings.setdefault(pat.name, nid)
        return bound == nid
    if isinstance(pat, Opt):
        if node.op is pat.op and (is_root or pat.shared or len(hir.users(nid)) == 1):
            saved = (dict(m.bindings), list(m.interior))
            m.bindings[pat.name] = nid
            if not is_root:
                m.interior.append(nid)
            if _match(hir, pat.inner, node.inputs[0], m, False):
                return True
            m.bindings, m.interior = saved
        return _match(hir, pat.inner, nid, m, is_root)
    ops = pat.op if isinstance(pat.op, tuple) else (pat.op,)
    if node.op not in ops or len(node.inputs) != len(pat.args):
        return False
    if pat.where is not None and not pat.where(node):
        return False
    if not is_root and not pat.shared and (len(hir.users(nid)) != 1 or nid in hir.outputs.values()):
        return False
    orders = [node.inputs] if not pat.commutative else [node.inputs, tuple(reversed(node.inputs))]
    for inputs in orders:
        saved = (dict(m.bindings), list(m.interior))
        if pat.name:
            m.bindings[pat.name] = nid
        if not is_root:
            m.interior.append(nid)
        if all(_match(hir, p, i, m, False) for p, i in zip(pat.args, inputs, strict=True)):
            return True
        m.bindings, m.interior = saved
    return False


def match(hir: HIR, pat: Pattern, nid: str) -> Match | None:
    m = Match(nid)
    return m if _match(hir, pat, nid, m, True) else None


Rewrite = Callable[[HIR, Match], str | None]


@dataclass(frozen=True)
class Rule:
    """`rewrite` builds the replacement and returns its id (None declines the match)."""

    name: str
    pattern: Pattern
    rewrite: Rewrite


def apply_rules(hir: HIR, rules: Sequence[Rule], *, max_rounds: int = 100) -> dict[str, int]:
    """Rewrite to a fixpoint in place; returns hits per rule name. Replaced nodes are removed."""
    hits = {r.name: 0 for r in rules}
    for _ in range(max_rounds):
        changed = False
        for node in hir.nodes():
            if node.id not in hir:
                continue
            for rule in rules:
                m = match(hir, rule.pattern, node.id)
                if m is None:
                    continue
                new = rule.rewrite(hir, m)
                if new is None:
                    continue
                hir.replace_uses(node.id, new)
                remove_dead(hir, [node.id, *m.interior])
                hits[rule.name] += 1
                changed = True
                break
        if not changed:
            break
    return hits


def remove_dead(hir: HIR, candidates: Sequence[str]) -> int:
    """Remove candidates (and what only they used) that no longer have users; graph inputs stay,
    so a rewrite never changes the function's signature."""
    removed = 0
    stack = list(candidates)
    outputs = set(hir.outputs.values())
    while stack:
        nid = stack.pop()
        if nid not in hir or nid in outputs or hir.users(nid) or hir.node(nid).op is Op.INPUT:
            continue
        inputs = hir.node(nid).inputs
        hir.remove(nid)
        removed += 1
        stack.extend(inputs)
    return removed
