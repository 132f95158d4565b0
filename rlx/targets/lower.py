"""HIR -> Relax IRModule: one Relax function per graph, one lowering per HIR op (`LOWERINGS`).

Calling convention of every function (`Signature` records it for the runtime):
- parameters: the graph inputs sorted by name (natural order: `x.2` before `x.10`), then the
  KV cache buffers (`kv_cache.py`: `cache_k.i` [B, H, KV_CAP, D] per `present_k.i` output,
  written in place; they replace the `past_*` inputs), then one shape argument with the dims
  the replaced inputs carried (`PAST_SEQ`), when there are any, then the weights sorted by
  `ParamSpec.key`. Weights are inputs, never constants, so one
  compiled module serves any checkpoint of the same shape. Whatever the graph computes from
  weights alone (a derived param `stored * scale + shift`, the q|k|v or gate|up concat the
  fusion passes add) is not lowered: the frontier of that weight-only part becomes the
  parameters, and the runtime computes them once on the host when it loads the weights
  (`ParamSpec.materialize`), in the layout the kernels read.
- symbolic dims (`SEQ`, `PAST_SEQ`, `BATCH`) are int64 `tvm.tirx.Var`s, one per symbol per
  function, shared by all of its params; `PAST_SEQ+SEQ` is the expression of the two.
- result: a Relax tuple of the HIR outputs in `hir.outputs` order (a `present_*` output is its
  cache buffer, after the write).

Ops map to Relax operators where Relax has one (matmul-free ones: take, permute_dims, reshape,
concat, strided_slice, repeat, softmax, rms_norm, gelu_tanh, tanh, topk) and to TE computes
from `kernels.py` otherwise (linear and the other contractions, RoPE, masks, MoE expert
contractions). Every value is pinned to the HIR's declared type (a match_cast where Relax
infers a less simple shape), so shapes downstream stay the HIR's.

Dtypes (graphs the `precision` pass rewrote): the lowering rounds where the interpreter does.
Contractions of f16 / bf16 operands accumulate in float32 (`kernels._product`), a linear's
epilogue runs on that accumulator, and the result is rounded to the node's dtype once
(`_rounded`); scale, softcap, softmax and gelu of f16 / bf16 values compute in float32
(`_in_f32`), rms_norm reduces in float32 by itself. A weight's cast to f16 / bf16 is weight-only,
so it is a load-time param like any other.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.sym import Analyzer

from rlx.compiler.dtypes import DType
from rlx.compiler.graph import HIR, Node, param_key
from rlx.compiler.interpreter import Interpreter
from rlx.compiler.ops import EPILOGUE_STEPS, Op, attr_dim, parse_step
from rlx.compiler.shapes import Dim, Shape, dim_symbols
from rlx.compiler.tensor_type import TensorType
from rlx.errors import HIRError
from rlx.targets import kernels, kv_cache

TVM_DTYPES: dict[DType, str] = {
    DType.F32: "float32", DType.F16: "float16", DType.BF16: "bfloat16",
    DType.I32: "int32", DType.I64: "int64", DType.BOOL: "bool",
}


@dataclass(frozen=True)
class ParamSpec:
    """One function parameter holding weights: a stored tensor, or a weight-only computation
    (a derived `stored * scale + shift`, a fused q|k|v concat...) hoisted out of the kernels.

    `program` is a small weight-only HIR with one output, `value`, that computes it; the runtime
    runs it once with the reference interpreter when loading weights (`materialize`). `key` is
    the canonical expression, so two functions (or two graphs) that use the same weights share
    one uploaded tensor.
    """

    key: str
    type: TensorType
    program: HIR

    @property
    def stored(self) -> tuple[str, ...]:
        """The stored tensors it reads."""
        return tuple(sorted({param_key(n)[0] for n in self.program.params.values()}))

    def materialize(self, load: Callable[[str], np.ndarray]) -> np.ndarray:
        """Compute it on the host from the stored tensors (`load(name)`), in the param's dtype."""
        value = Interpreter(self.program, load).run({})["value"]
        return np.ascontiguousarray(value, dtype=self.type.dtype.numpy)


@dataclass(frozen=True)
class Signature:
    """How to call one lowered function: inputs, caches, the `dims` shape (if any), params, in
    this order; outputs by name."""

    function: str
    inputs: tuple[tuple[str, TensorType], ...]
    params: tuple[ParamSpec, ...]
    outputs: tuple[str, ...]
    caches: tuple[tuple[str, TensorType], ...] = ()
    dims: tuple[str, ...] = ()  # symbols passed as one ShapeTuple (their values: the cache fill)


@dataclass
class Lowered:
    mod: tvm.IRModule
    signatures: dict[str, Signature]


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def weight_only(hir: HIR) -> set[str]:
    """Nodes computed from params alone (at least one param, no graph input): load-time work."""
    params, inputs = set(), set()
    for n in hir.nodes():
        params.update([n.id] if n.op is Op.PARAM or any(i in params for i in n.inputs) else [])
        inputs.update([n.id] if n.op is Op.INPUT or any(i in inputs for i in n.inputs) else [])
    return params - inputs


def _expr_key(hir: HIR, node_id: str, memo: dict[str, str]) -> str:
    """Canonical text of a weight-only value: equal computations get equal keys in any graph."""
    if node_id not in memo:
        n = hir.node(node_id)
        if n.op is Op.PARAM:
            name, scale, shift = param_key(n)
            memo[node_id] = name if (scale, shift) == (1.0, 0.0) else f"{name}*{scale!r}+{shift!r}"
        elif n.op is Op.CONST:
            memo[node_id] = "const:" + hashlib.sha1(repr((n.type, n.attrs)).encode()).hexdigest()[:12]
        else:
            attrs = ",".join(f"{k}={v!r}" for k, v in n.attrs)
            args = ",".join(_expr_key(hir, i, memo) for i in n.inputs)
            memo[node_id] = f"{n.op.value}{{{attrs}}}({args})"
    return memo[node_id]


def _program(hir: HIR, node_id: str) -> HIR:
    """The weight-only subgraph computing `node_id`, as an HIR with output `value`."""
    out = HIR(f"{hir.name}.{node_id}")
    needed: set[str] = set()
    stack = [node_id]
    while stack:
        nid = stack.pop()
        if nid not in needed:
            needed.add(nid)
            stack.extend(hir.node(nid).inputs)
    for n in hir.nodes():
        if n.id in needed:
            out.insert_raw(n)
    out.raw_set_output("value", node_id)
    return out


def _param_nodes(hir: HIR) -> dict[str, ParamSpec]:
    """Weight-only nodes the rest of the graph reads (or that are outputs), by node id."""
    weights = weight_only(hir)
    used = {i for n in hir.nodes() if n.id not in weights for i in n.inputs} | set(hir.outputs.values())
    memo: dict[str, str] = {}
    return {nid: ParamSpec(_expr_key(hir, nid, memo), hir.node(nid).type, _program(hir, nid))
            for nid in sorted(weights & used)}


def signature_of(hir: HIR, function: str) -> Signature:
    slots = kv_cache.plan(hir)
    replaced = {s.past_input for s in slots}
    inputs = tuple((name, node.type) for name, node in sorted(hir.inputs.items(), key=lambda kv: _natural(kv[0]))
                   if name not in replaced)
    dims = sorted(set().union(*(dim_symbols([s.offset]) for s in slots)))
    params = tuple(sorted(_param_nodes(hir).values(), key=lambda p: p.key))
    caches = tuple((s.cache, s.type) for s in sorted(slots, key=lambda s: _natural(s.cache)))
    return Signature(function, inputs, params, tuple(hir.outputs), caches, tuple(dims))


class _Fn:
    """Lowering state of one function: the block builder, symbolic dims, values by node id."""

    def __init__(self, bb: relax.BlockBuilder, hir: HIR) -> None:
        self.bb = bb
        self.hir = hir
        symbols = sorted(set().union(*(dim_symbols(n.type.shape) for n in hir.nodes())) | {kv_cache.KV_CAP})
        self.dims = {s: tirx.Var(s, "int64") for s in symbols}
        self.values: dict[str, relax.Expr] = {}
        self.results: dict[str, relax.Expr] = {}  # multi-result nodes: their full tuple
        self.views: dict[str, CacheView] = {}  # concatenated K/V, as (cache buffer, valid length)

    def value(self, node_id: str) -> relax.Expr:
        """A node's value; a cache view is materialized (its valid prefix, copied) on first use by
        a reader that cannot take the buffer itself."""
        if node_id not in self.values:
            view = self.views[node_id]
            prefix = relax.op.strided_slice(view.tensor, axes=[2], begin=[tirx.IntImm("int64", 0)], end=[view.length],
                                            assume_inbound=True)
            self.values[node_id] = self.pin(prefix, self.hir.node(node_id).type, node_id)
        return self.values[node_id]

    def dim(self, d: Dim) -> tirx.PrimExpr:
        if isinstance(d, int):
            return tirx.IntImm("int64", d)
        expr: tirx.PrimExpr = tirx.IntImm("int64", d.const)
        for name, coeff in d.terms:
            expr = expr + self.dims[name] * coeff if coeff != 1 else expr + self.dims[name]
        return Analyzer().simplify(expr)

    def shape(self, shape: Shape) -> list[tirx.PrimExpr]:
        return [self.dim(d) for d in shape]

    def ty(self, t: TensorType) -> relax.TensorType:
        return relax.TensorType(self.shape(t.shape), TVM_DTYPES[t.dtype])

    def emit(self, expr: relax.Expr) -> relax.Var:
        return expr if isinstance(expr, relax.Var) else self.bb.emit(expr)

    def te(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> relax.Var:
        return self.bb.emit_te(fn, *args, **kwargs)

    def pin(self, value: relax.Expr, t: TensorType, what: str) -> relax.Var:
        """Make `value`'s Relax type the HIR type (match_cast when Relax's shape is less simple)."""
        var = self.emit(value)
        got = var.ty
        want = self.ty(t)
        if not isinstance(got, relax.TensorType) or got.dtype != want.dtype or got.ndim != want.ndim:
            raise HIRError(f"lowering {what}: Relax type {got} does not match HIR type {t}")
        analyzer = Analyzer()
        same = got.shape is not None and all(
            analyzer.can_prove_equal(a, b) for a, b in zip(got.shape.values, want.shape.values, strict=True))
        return var if same else self.bb.match_cast(var, want)


@dataclass(frozen=True)
class CacheView:
    """K or V of all positions so far: the first `length` rows (axis 2) of a cache buffer."""

    tensor: relax.Var
    length: tirx.PrimExpr


CACHE_READERS = frozenset({Op.ATTENTION})  # lowerings that take a CacheView instead of a tensor


F32 = "float32"


def _dtype(x: relax.Expr) -> str:
    """The element dtype of a lowered value (what reaches a lowering is an emitted var)."""
    return str(x.ty.dtype)


def _scalar(value: float, dtype: str = F32) -> relax.Constant:
    return relax.const(value, dtype)


def _as(x: relax.Expr, dtype: str) -> relax.Expr:
    return x if _dtype(x) == dtype else relax.op.astype(x, dtype)


def _in_f32(compute: Callable[..., relax.Expr], *xs: relax.Expr) -> relax.Expr:
    """`compute(*xs)` in float32, rounded back to the first operand's dtype: how the interpreter
    runs scale, softcap, softmax and gelu on f16 / bf16 values (one rounding, of the result). A
    float32 graph lowers exactly as before; the casts are elementwise, so FuseOps folds them
    into the neighbouring kernels."""
    dtype = _dtype(xs[0])
    if dtype == F32:
        return compute(*xs)
    return relax.op.astype(compute(*(relax.op.astype(x, F32) for x in xs)), dtype)


def _rounded(node: Node, y: relax.Expr) -> relax.Expr:
    """A contraction's float32 accumulator (`kernels._product`) rounded to the node's dtype."""
    return _as(y, TVM_DTYPES[node.type.dtype])


# ---- shared pieces (unfused ops and the fused ops that contain them use the same ones) ----
def _scale(x: relax.Expr, value: float) -> relax.Expr:
    return _in_f32(lambda y: relax.op.multiply(y, _scalar(value)), x)


def _softcap(x: relax.Expr, cap: float) -> relax.Expr:
    return _in_f32(lambda y: relax.op.multiply(relax.op.tanh(relax.op.divide(y, _scalar(cap))), _scalar(cap)), x)


def _softmax(x: relax.Expr) -> relax.Expr:
    return _in_f32(lambda y: relax.op.nn.softmax(y, axis=-1), x)


def _rmsnorm(fn: _Fn, x: relax.Expr, w: relax.Expr | None, eps: float, offset: float, width: Dim) -> relax.Expr:
    """TVM's rms_norm reduces in float32 for every input dtype (as the interpreter does); its
    weight must be in x's dtype."""
    if w is None:
        weight: relax.Expr = relax.const(np.ones(int(width), np.dtype(_dtype(x))))  # type: ignore[arg-type]
    else:
        weight = w if offset == 0 else fn.emit(relax.op.add(w, _scalar(offset, _dtype(w))))
    return relax.op.nn.rms_norm(x, weight, axes=[-1], epsilon=float(eps))


def _geglu(fn: _Fn, gate: relax.Expr, up: relax.Expr) -> relax.Expr:
    return _in_f32(lambda g, u: relax.op.multiply(relax.op.nn.gelu_tanh(g), u), gate, up)


def _halves(fn: _Fn, x: relax.Expr) -> tuple[relax.Expr, relax.Expr]:
    parts = fn.emit(relax.op.split(x, 2, axis=-1))
    return fn.emit(relax.TupleGetItem(parts, 0)), fn.emit(relax.TupleGetItem(parts, 1))


def _mask(fn: _Fn, scores: relax.Expr, pos: relax.Expr, window: int, bidirectional: bool) -> relax.Expr:
    return fn.te(kernels.causal_mask, scores, pos, window=window, bidirectional=bidirectional)


def _matmul(fn: _Fn, node: Node, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    return _rounded(node, fn.te(kernels.matmul, a, b, out_batch=fn.shape(node.type.shape[:-2])))


def _slice(fn: _Fn, node: Node, x: relax.Expr, src: TensorType) -> relax.Expr:
    at = node.attr_dict
    axis = at["axis"] % src.rank
    dim = fn.dim(src.shape[axis])
    start, stop = at["start"], at["stop"]
    begin = dim + start if start < 0 else tirx.IntImm("int64", start)
    end = dim if stop is None else tirx.IntImm("int64", stop)
    return relax.op.strided_slice(x, axes=[axis], begin=[begin], end=[end], assume_inbound=True)


def _window_start(node: Node, q: relax.Expr, k: CacheView, bias: list[relax.Expr]) -> tirx.PrimExpr | int:
    """First cache row a sliding-window layer can see: the call's queries sit at the last S
    positions (the engine writes row p for position p), so with window W none sees a key below
    T - S - W + 1; reading from there keeps a long cache's cost at W rows per sliding layer.
    0 (every row) for global layers and when an additive bias spans all T keys."""
    at = node.attr_dict
    if at["mask"] != "causal" or not at["window"] or bias:
        return 0
    seq = q.ty.shape.values[2]
    return Analyzer().simplify(tirx.max(tirx.IntImm("int64", 0), k.length - seq - at["window"] + 1))


def _attention(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """The fused op as one chain of the unfused pieces (GQA by index, K/V never repeated)."""
    at = node.attr_dict
    q, k, v, pos, *bias = args
    start: tirx.PrimExpr | int = 0
    if isinstance(k, CacheView):
        start = _window_start(node, q, k, bias)
        s = fn.te(kernels.attention_scores, q, k.tensor, length=k.length, start=start)
    else:
        s = fn.te(kernels.attention_scores, q, k)
    if at["scale"] != 1.0:
        s = fn.emit(_scale(s, at["scale"]))
    if at["softcap"]:
        s = fn.emit(_softcap(s, at["softcap"]))
    if at["mask"] != "none":
        s = fn.te(kernels.causal_mask, s, pos, window=at["window"], bidirectional=at["mask"] == "bidirectional",
                  key_start=start)
    for b in bias:
        s = fn.emit(relax.op.add(s, _as(b, _dtype(s))))
    values = v.tensor if isinstance(v, CacheView) else v
    # scores accumulate in f32 (kernels._product) and stay f32 through softmax; the weights are
    # rounded to v's dtype before the value product, as the interpreter does
    probs = fn.emit(_as(fn.emit(relax.op.nn.softmax(s, axis=-1)), _dtype(values)))
    return _rounded(node, fn.te(kernels.attention_values, probs, values, start=start))


def _add_rmsnorm(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    at = node.attr_dict
    total = fn.emit(relax.op.add(args[0], args[1]))
    normed = fn.emit(_rmsnorm(fn, total, args[2] if len(args) > 2 else None, at["eps"], at["offset"],
                              node.type.shape[-1]))
    return relax.Tuple([normed, total])


_STEPS: dict[str, Callable[[relax.Expr, relax.Expr | None, float | None], relax.Expr]] = {
    "add": lambda y, o, v: relax.op.add(y, _as(o, _dtype(y))),  # type: ignore[arg-type]
    "mul": lambda y, o, v: relax.op.multiply(y, _as(o, _dtype(y))),  # type: ignore[arg-type]
    "scale": lambda y, o, v: _scale(y, v),  # type: ignore[arg-type]
    "softcap": lambda y, o, v: _softcap(y, v),  # type: ignore[arg-type]
    "gelu_tanh": lambda y, o, v: _in_f32(relax.op.nn.gelu_tanh, y),
}


def _linear_epilogue(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """The steps run on the linear's accumulator (float32 for f16 / bf16 operands, operands
    widened to it) and the result is rounded once, as the interpreter does."""
    y = fn.te(kernels.linear, args[0], args[1])
    operands = list(args[2:])
    for step in node.attr("steps"):
        kind, value = parse_step(step)
        y = fn.emit(_STEPS[kind](y, operands.pop(0) if EPILOGUE_STEPS[kind] else None, value))
    return _rounded(node, y)


def _moe(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """Token-choice top-k routing: softmax router, top-k experts per token, renormalised weights
    times the per-expert scale; only the chosen experts' weights are read (gathered by index).
    Routing and the expert sums run on the contractions' float32 accumulators (f16 / bf16
    operands are widened inside them); the output is rounded to the node's dtype once."""
    x, router_x, proj, per_expert, gate_up, down = args
    top_k = node.attr("top_k")
    lead, hidden = node.type.shape[:-1], fn.dim(node.type.shape[-1])
    tokens = Analyzer().simplify(functools.reduce(operator.mul, [fn.dim(d) for d in lead], fn.dim(1)))
    xt = fn.emit(relax.op.reshape(x, [tokens, hidden]))
    rt = fn.emit(relax.op.reshape(router_x, [tokens, hidden]))
    probs = fn.emit(relax.op.nn.softmax(fn.te(kernels.linear, rt, proj), axis=-1))
    top = fn.emit(relax.op.topk(probs, top_k, axis=-1, ret_type="both", largest=True, dtype="int64"))
    values, experts = fn.emit(relax.TupleGetItem(top, 0)), fn.emit(relax.TupleGetItem(top, 1))
    norm = fn.emit(relax.op.divide(values, relax.op.sum(values, axis=-1, keepdims=True)))
    weights = fn.emit(relax.op.multiply(norm, _as(fn.emit(relax.op.take(per_expert, experts, axis=0)),
                                                  _dtype(norm))))
    h = fn.te(kernels.moe_gate_up, xt, gate_up, experts)
    act = fn.emit(_geglu(fn, *_halves(fn, h)))
    y = fn.te(kernels.moe_down, act, down, experts)
    out = fn.emit(relax.op.sum(relax.op.multiply(y, relax.op.expand_dims(weights, -1)), axis=1))
    return _rounded(node, fn.emit(relax.op.reshape(out, fn.shape(node.type.shape))))


def _geglu_op(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    gate, up = _halves(fn, args[0]) if len(args) == 1 else args
    return _geglu(fn, gate, up)


Lowering = Callable[[_Fn, Node, list[relax.Expr]], relax.Expr]


def _input_type(fn: _Fn, node: Node, i: int) -> TensorType:
    return fn.hir.node(node.inputs[i]).type


LOWERINGS: dict[Op, Lowering] = {
    Op.EMBED: lambda fn, n, a: relax.op.take(a[0], a[1], axis=0),
    Op.SCALE: lambda fn, n, a: _scale(a[0], n.attr("value")),
    Op.ADD: lambda fn, n, a: relax.op.add(a[0], a[1]),
    Op.MUL: lambda fn, n, a: relax.op.multiply(a[0], a[1]),
    Op.RMSNORM: lambda fn, n, a: _rmsnorm(fn, a[0], a[1] if len(a) > 1 else None, n.attr("eps"), n.attr("offset"),
                                          n.type.shape[-1]),
    Op.LINEAR: lambda fn, n, a: _rounded(n, fn.te(kernels.linear, a[0], a[1])),
    Op.GELU_TANH: lambda fn, n, a: _in_f32(relax.op.nn.gelu_tanh, a[0]),
    Op.SOFTCAP: lambda fn, n, a: _softcap(a[0], n.attr("cap")),
    Op.RESHAPE: lambda fn, n, a: relax.op.reshape(a[0], fn.shape(tuple(attr_dim(d) for d in n.attr("shape")))),
    Op.TRANSPOSE: lambda fn, n, a: relax.op.permute_dims(a[0], list(n.attr("perm"))),
    Op.REPEAT_KV: lambda fn, n, a: relax.op.repeat(a[0], n.attr("repeats"), axis=1),
    Op.ROPE: lambda fn, n, a: fn.te(kernels.rope, a[0], a[1], a[2]),
    Op.ROPE_TABLE: lambda fn, n, a: fn.te(kernels.rope_table, a[0], a[1], a[2]),
    Op.MATMUL: lambda fn, n, a: _matmul(fn, n, a[0], a[1]),
    Op.CAUSAL_MASK: lambda fn, n, a: _mask(fn, a[0], a[1], n.attr("window"), n.attr("bidirectional")),
    Op.SOFTMAX: lambda fn, n, a: _softmax(a[0]),
    Op.CONCAT: lambda fn, n, a: relax.op.concat(a, axis=n.attr("axis")),
    Op.SLICE: lambda fn, n, a: _slice(fn, n, a[0], _input_type(fn, n, 0)),
    Op.CAST: lambda fn, n, a: relax.op.astype(a[0], TVM_DTYPES[n.type.dtype]),
    Op.MOE: _moe,
    Op.ATTENTION: _attention,
    Op.ADD_RMSNORM: _add_rmsnorm,
    Op.GEGLU: _geglu_op,
    Op.LINEAR_EPILOGUE: _linear_epilogue,
}


def _var_name(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _const(fn: _Fn, node: Node) -> relax.Expr:
    shape = [int(d) for d in node.type.shape]  # type: ignore[arg-type]
    return relax.const(np.asarray(node.attr("value"), dtype=node.type.dtype.numpy).reshape(shape))


def _lower_function(bb: relax.BlockBuilder, hir: HIR, sig: Signature, writers: Mapping[str, tvm.ir.GlobalVar]) -> None:
    fn = _Fn(bb, hir)
    node_of = {p.key: nid for nid, p in _param_nodes(hir).items()}
    inputs = {name: relax.Var(_var_name(name), fn.ty(t)) for name, t in sig.inputs}
    caches = {name: relax.Var(_var_name(name), fn.ty(t)) for name, t in sig.caches}
    dims = [relax.Var("dims", relax.ShapeType([fn.dims[d] for d in sig.dims]))] if sig.dims else []
    params = [relax.Var("w_" + _var_name(node_of[p.key]), fn.ty(p.type)) for p in sig.params]
    for name, var in inputs.items():
        fn.values[hir.inputs[name].id] = var
    for p, var in zip(sig.params, params, strict=True):
        fn.values[node_of[p.key]] = var
    slots = {s.node: s for s in kv_cache.plan(hir)}
    written: dict[str, relax.Var] = {}  # present_* output -> its cache buffer after this call's write

    def write(slot: kv_cache.CacheSlot) -> relax.Var:
        args = [caches[slot.cache], fn.value(slot.new), relax.prim_value(fn.dim(slot.offset))]
        written[slot.output] = fn.emit(relax.call_tir_inplace(writers[TVM_DTYPES[slot.type.dtype]], args, 0,
                                                              fn.ty(slot.type)))
        return written[slot.output]

    skip = weight_only(hir)  # computed on the host at load time; the frontier arrives as params
    with bb.function(sig.function, [*inputs.values(), *caches.values(), *dims, *params]):
        with bb.dataflow():
            for node in hir.nodes():
                if node.op is Op.INPUT or node.id in skip:
                    continue
                slot = slots.get(node.id)
                if slot is not None and slot.past_input is not None:  # the concat: write, then view
                    fn.views[node.id] = CacheView(write(slot), fn.dim(node.type.shape[2]))
                    continue
                if node.op is Op.CONST:
                    fn.values[node.id] = fn.emit(_const(fn, node))
                    continue
                if node.op is Op.RESULT:
                    item = relax.TupleGetItem(fn.results[node.inputs[0]], node.attr("index"))
                    fn.values[node.id] = fn.pin(item, node.type, node.id)
                    continue
                lowering = LOWERINGS.get(node.op)
                if lowering is None:
                    raise HIRError(f"%{node.id}: op {node.op.value} has no TVM lowering")
                raw = node.op in CACHE_READERS
                out = lowering(fn, node, [fn.views[i] if raw and i in fn.views else fn.value(i) for i in node.inputs])
                if isinstance(out, relax.Tuple):  # multi-result op: result 0 is the node's value
                    fn.results[node.id] = fn.emit(out)
                    out = relax.TupleGetItem(fn.results[node.id], 0)
                fn.values[node.id] = fn.pin(out, node.type, node.id)
                if slot is not None:  # a prefill's K/V: the rows at offset 0
                    write(slot)
            result = bb.emit_output(relax.Tuple([written[name] if name in written else fn.value(nid)
                                                 for name, nid in hir.outputs.items()]))
        bb.emit_func_output(result)


def lower(graphs: Mapping[str, HIR]) -> Lowered:
    """Lower several graphs (function name -> HIR) into ONE IRModule, so they share kernels and
    compile once."""
    bb = relax.BlockBuilder()
    signatures: dict[str, Signature] = {}
    for function, hir in graphs.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", function):
            raise HIRError(f"function name {function!r} must be an identifier")
        signatures[function] = signature_of(hir, function)
    dtypes = sorted({TVM_DTYPES[t.dtype] for sig in signatures.values() for _, t in sig.caches})
    writers = {dtype: bb.add_func(kernels.kv_write(dtype), f"kv_write_{dtype}") for dtype in dtypes}
    for function, hir in graphs.items():
        _lower_function(bb, hir, signatures[function], writers)
    return Lowered(bb.get(), signatures)


def lower_hir(hir: HIR, function: str | None = None) -> Lowered:
    """One graph; the function is named `function` or after the HIR (`gemma3_prefill`)."""
    return lower({function or _var_name(hir.name): hir})


def param_keys(signatures: Sequence[Signature]) -> dict[str, ParamSpec]:
    """Every distinct param over several functions, by key (what to upload once and share)."""
    out: dict[str, ParamSpec] = {}
    for sig in signatures:
        for p in sig.params:
            out.setdefault(p.key, p)
    return out
