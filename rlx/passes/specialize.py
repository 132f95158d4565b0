"""Dynamic-dim specialization: bind `SEQ` / `PAST_SEQ` / `BATCH` to ints, or to a set of buckets.

`specialize{SEQ=128}` rewrites every node type, reshape `shape` attr and input type, so the
result has no trace of the symbol and a target can plan static buffers. The binding is kept as
an upper bound in `hir.meta["bounds"]` (memory planning reads it; see `upper_bounds`).

`specialize_buckets` makes one static variant per prompt-length bucket; `runtime.dispatch`
pads a prompt up to the smallest bucket that holds it and slices the results back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from rlx.errors import HIRError
from rlx.hir import conventions as cv
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op, attr_dim
from rlx.hir.pass_infra import Pass, PassError, PassResult, register
from rlx.hir.shapes import BATCH, PAST_SEQ, SEQ, Dim, dim_symbols, substitute
from rlx.hir.verify import verify

SYMBOLS = (BATCH, PAST_SEQ, SEQ)
BOUNDS = "bounds"
SELECT_INPUT = cv.LAST_TOKEN_SELECT
# inputs whose padded values would change what real tokens compute: a user mask or bias may let a
# real query see a pad key, so bucketing refuses graphs that take them
UNPADDABLE_INPUTS = (cv.ATTN_MASK, cv.MEDIA_ATTN_BIAS)

# bindings; a str (from `specialize{dims=...}`) is refused by `parse_dims` with the syntax to use
DimsSpec = Mapping[str, int | str] | Sequence[tuple[str, int | str]] | str


def upper_bounds(hir: HIR) -> dict[str, int]:
    """The largest value each specialized symbol takes in this graph's family (for memory planning)."""
    return dict(hir.meta.get(BOUNDS, {}))


def record_bounds(hir: HIR, bounds: Mapping[str, int]) -> None:
    hir.meta[BOUNDS] = dict(sorted({**upper_bounds(hir), **bounds}.items()))


def graph_symbols(hir: HIR) -> frozenset[str]:
    """Symbols left in any node type (reshape attrs always match their node's type)."""
    out: frozenset[str] = frozenset()
    for n in hir.nodes():
        out |= dim_symbols(n.type.shape)
    return out


def _positive(name: str, raw: object) -> int:
    """Bindings arrive as text from pipelines (`SEQ=128`) or as ints from Python."""
    text = raw.strip() if isinstance(raw, str) else raw
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if not isinstance(text, int) or isinstance(text, bool) or text < 1:
        raise PassError(f"specialize: {name}={raw!r} is not a positive integer", hint=f"e.g. specialize{{{name}=128}}")
    return text


def parse_dims(dims: DimsSpec) -> tuple[tuple[str, int], ...]:
    """Validate bindings into sorted `(symbol, size)` pairs; an unknown symbol is named in the error."""
    if isinstance(dims, str):
        raise PassError(f"specialize: bindings must be SYMBOL=size pairs, got {dims!r}",
                        hint="write specialize{SEQ=128} (several: specialize{BATCH=1,SEQ=128})")
    items = list(dims.items()) if isinstance(dims, Mapping) else list(dims)
    out: dict[str, int] = {}
    for name, raw in items:
        if name not in SYMBOLS:
            raise PassError(f"specialize: unknown symbol {name!r}", hint=f"bind one of {', '.join(SYMBOLS)}")
        if name in out:
            raise PassError(f"specialize: {name} is bound twice", hint="bind each symbol once")
        out[name] = _positive(name, raw)
    return tuple(sorted(out.items()))


def _bind_attr_shape(shape: tuple[int | str, ...], env: Mapping[str, int]) -> tuple[int | str, ...]:
    dims = (substitute(attr_dim(d), env) for d in shape)
    return tuple(d if isinstance(d, int) else str(d) for d in dims)


def bind(hir: HIR, env: Mapping[str, int]) -> tuple[HIR, int]:
    """A copy with `env` substituted into every type and reshape attr, and how many nodes were retyped.

    The graph is rebuilt in its own topological order, so the text form keeps its node order.
    """
    out = HIR(hir.name)
    out.meta = copy.deepcopy(hir.meta)
    retyped = 0
    for node in hir.nodes():
        shape: tuple[Dim, ...] = tuple(substitute(d, env) for d in node.type.shape)
        attrs: tuple[tuple[str, Any], ...] = node.attrs
        if node.op is Op.RESHAPE:
            attrs = tuple((k, _bind_attr_shape(v, env) if k == "shape" else v) for k, v in node.attrs)
        retyped += shape != node.type.shape
        out.insert_raw(Node(node.id, node.op, node.inputs, node.type.with_shape(shape), attrs, dict(node.meta)))
    for name, nid in hir.outputs.items():
        out.raw_set_output(name, nid)
    return out, retyped


@register
@dataclass(frozen=True)
class Specialize(Pass):
    """`specialize{SEQ=128}`: bind symbols to sizes. Symbols the graph does not use are ignored, so
    one pipeline serves a prefill graph (symbolic SEQ) and a decode graph (SEQ is 1) alike."""

    name = "specialize"
    dims: DimsSpec = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", parse_dims(self.dims))
        if not self.dims:
            raise PassError("specialize needs a binding", hint="e.g. specialize{SEQ=128}")

    @property
    def bindings(self) -> dict[str, int]:
        """The validated bindings (`dims` holds sorted `(symbol, size)` pairs after __post_init__)."""
        return dict(cast(tuple[tuple[str, int], ...], self.dims))

    def __str__(self) -> str:
        return f"{self.name}{{{','.join(f'{k}={v}' for k, v in self.bindings.items())}}}"

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Specialize:
        """Every option is a symbol binding: `specialize{SEQ=128,BATCH=1}` (`dims=...`, the field
        itself, is refused by `parse_dims` with the syntax to use)."""
        return cls(dims=options["dims"] if "dims" in options else tuple(options.items()))

    def run(self, hir: HIR) -> PassResult:
        present = graph_symbols(hir)
        env = {k: v for k, v in self.bindings.items() if k in present}
        if not env:
            return PassResult(hir.copy(), False, {"retyped": 0})
        out, retyped = bind(hir, env)
        record_bounds(out, env)
        try:
            verify(out)
        except HIRError as e:  # e.g. a static slice past the new size
            raise PassError(f"{self}: the graph does not hold at these sizes: {e}",
                            hint="bind sizes the graph can take (SEQ at least as long as its static slices)") from None
        return PassResult(out, True, {"retyped": retyped})


@dataclass(frozen=True)
class BucketedGraphs:
    """One static variant per bucket of `dim`, and the dynamic graph they stand for.

    `select_input` names the one-hot input that replaces a last-token slice (see
    `select_last_token`); None when the graph has no such slice.
    """

    source: HIR
    dim: str
    variants: Mapping[int, HIR]
    select_input: str | None = None

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.variants))


def select_last_token(hir: HIR, dim: str) -> tuple[HIR, str | None]:
    """Replace each `slice(x, start=-1)` over `dim` by `matmul(select, x)`, `select` a one-hot input.

    A padded prompt's last position is a pad, so a last-token slice would pick the wrong row.
    The dispatcher feeds `select` [.., 1, S] with a 1 at the last REAL position instead. Why a
    one-hot product and not "output every position's logits and pick the row afterwards": it is
    a local rewrite (downstream types are unchanged, so the final norm, LM head and softcap still
    run on one row instead of bucket-many vocab-sized rows) and it needs no new op. It is exact in
    f32: the sum is `1 * x[last]` plus zeros, and pad rows are finite.
    """
    slices = [n for n in hir.nodes_of(Op.SLICE)
              if n.attr("start") == -1 and n.attr("stop") is None
              and dim in dim_symbols([hir.node(n.inputs[0]).type.shape[n.attr("axis")]])]
    if not slices:
        return hir, None
    out = hir.copy()
    select: str | None = None
    for n in slices:
        x = out.node(n.inputs[0]).type
        axis = n.attr("axis") % x.rank
        if axis != x.rank - 2:
            raise PassError(f"cannot bucket {dim}: %{n.id} takes the last token on axis {axis} of {x}",
                            hint="a last-token slice can be bucketed on the second-to-last axis only")
        sel_type = x.with_shape((*x.shape[:axis], 1, x.shape[axis]))
        if select is None:
            select = out.input(SELECT_INPUT, sel_type)
        elif out.node(select).type != sel_type:
            raise PassError(f"cannot bucket {dim}: last-token slices of {out.node(select).type} and {sel_type}",
                            hint="bucket graphs with one last-token output shape")
        picked = out.add(Op.MATMUL, [select, n.inputs[0]], name=n.id + ".select")
        out.replace_uses(n.id, picked)
        out.remove(n.id)
    return out, select


def _check_paddable(hir: HIR, dim: str) -> None:
    """End padding is only sound where real tokens cannot see later positions (see runtime.dispatch)."""
    if dim != SEQ:
        raise PassError(f"cannot bucket {dim}: only SEQ is bucketed",
                        hint="padding PAST_SEQ would put pads before the new tokens, where they see them")
    if dim not in graph_symbols(hir):
        raise PassError(f"cannot bucket {dim}: graph {hir.name} has no {dim} dim", hint="build it with dynamic_seq()")
    for name in UNPADDABLE_INPUTS:
        if name in hir.inputs:
            raise PassError(f"cannot bucket {dim}: input {name!r} may let real tokens attend to pads",
                            hint="drop [specialize] SEQ buckets for graphs with custom masks or media bias")
    for n in hir.nodes():
        attrs = n.attr_dict
        if attrs.get("bidirectional") is True or attrs.get("mask") == "bidirectional":
            raise PassError(f"cannot bucket {dim}: %{n.id} attends bidirectionally, so real tokens would see pads",
                            hint="drop [specialize] SEQ buckets for models with bidirectional layers")


def specialize_buckets(hir: HIR, dim: str = SEQ, buckets: Sequence[int] = (1, 32, 128, 512)) -> BucketedGraphs:
    """One `specialize{dim=b}` variant per bucket; each records the largest bucket as its bound."""
    sizes = sorted({_positive(dim, b) for b in buckets})
    if not sizes:
        raise PassError("specialize_buckets needs at least one bucket",
                        hint="give buckets, e.g. [specialize] SEQ = [32, 128]")
    _check_paddable(hir, dim)
    base, select = select_last_token(hir, dim)
    variants: dict[int, HIR] = {}
    for b in sizes:
        variant = Specialize(dims=((dim, b),)).run(base).hir
        variant.name = f"{hir.name}.{dim.lower()}{b}"
        record_bounds(variant, {dim: sizes[-1]})
        variants[b] = variant
    return BucketedGraphs(hir, dim, variants, select)
