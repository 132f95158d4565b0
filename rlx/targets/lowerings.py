"""One lowering per HIR op (`LOWERINGS`): Relax operators where Relax has one, TE computes from
`kernels.py` otherwise.

Dtypes (graphs the `precision` pass rewrote): the lowering rounds where the interpreter does.
Contractions of f16 / bf16 operands accumulate in float32 (`kernels._product`), a linear's
epilogue runs on that accumulator, and the result is rounded to the node's dtype once
(`_rounded`); scale, softcap, softmax and gelu of f16 / bf16 values compute in float32
(`_in_f32`), rms_norm reduces in float32 by itself.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import numpy as np
from tvm import relax, tirx
from tvm.sym import Analyzer

from rlx.hir.graph import Node
from rlx.hir.ops import EPILOGUE_STEPS, Op, attr_dim, parse_step
from rlx.hir.shapes import Dim, eval_dim, eval_shape
from rlx.hir.tensor_type import TensorType
from rlx.targets import flash_attention, kernels, weight_kernels
from rlx.targets.function_builder import TVM_DTYPES, CacheView, WeightView
from rlx.targets.function_builder import FunctionBuilder as _Fn

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
        weight: relax.Expr = relax.const(np.ones(eval_dim(width, {}), np.dtype(_dtype(x))))
    else:
        weight = w if offset == 0 else fn.emit(relax.op.add(w, _scalar(offset, _dtype(w))))
    return relax.op.nn.rms_norm(x, weight, axes=[-1], epsilon=float(eps))


def _gelu(fn: _Fn, x: relax.Expr) -> relax.Expr:
    """GELU (tanh form) computed in float32 (`kernels.gelu_tanh`), rounded to x's dtype."""
    xv = fn.emit(x)
    return _as(fn.te(kernels.gelu_tanh, xv), _dtype(xv))


def _geglu(fn: _Fn, gate: relax.Expr, up: relax.Expr) -> relax.Expr:
    return _in_f32(lambda g, u: relax.op.multiply(_gelu(fn, g), u), gate, up)


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


def _flash_spec(fn: _Fn, node: Node, paged: bool) -> flash_attention.FlashSpec:
    at = node.attr_dict
    q, k, v = (fn.hir.node(i).type for i in node.inputs[:3])
    pos = fn.hir.node(node.inputs[5 if paged else 3]).type
    return flash_attention.FlashSpec(
        paged=paged, heads=eval_dim(q.shape[1], {}), kv_heads=eval_dim(k.shape[1], {}), d=eval_dim(q.shape[3], {}),
        dv=eval_dim(v.shape[3], {}), dtype=TVM_DTYPES[q.dtype], kv_dtype=TVM_DTYPES[k.dtype],
        out_dtype=TVM_DTYPES[node.type.dtype], pos_dtype=TVM_DTYPES[pos.dtype], scale=float(at["scale"]),
        softcap=float(at["softcap"]), window=at["window"], page=eval_dim(k.shape[2], {}) if paged else 0)


def _flash(fn: _Fn, node: Node, spec: flash_attention.FlashSpec, args: list[relax.Expr]) -> relax.Expr:
    """A call of the flash kernel for `spec` (one PrimFunc per spec, shared by every layer that
    has it; `schedules.FlashAttention` regenerates it for the target)."""
    gv = fn.bb.add_func(flash_attention.flash_attention(spec), "flash_paged" if spec.paged else "flash_attention")
    return relax.call_tir(gv, args, fn.ty(node.type))


def flash_lowered(node: Node, device: str) -> bool:
    """Whether `node` is attention the flash kernel runs: causal (optionally sliding-window)
    attention on CPU; additive biases (custom masks, media attention: inputs past the 4th) and
    bidirectional / unmasked attention keep the materialised path, as do GPU targets (dlight
    schedules it). The kernel addresses keys modulo the cache buffer, so `kv_cache.plan` makes
    a cache only such readers read a ring."""
    return device == "cpu" and node.op is Op.ATTENTION and node.attr("mask") == "causal" and len(node.inputs) == 4


def _attention(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """Causal attention on CPU is the flash kernel over the cache buffer (or the prefill's own
    K/V); otherwise the fused op as one chain of the unfused pieces (materialised scores; GQA by
    index, K/V never repeated)."""
    at = node.attr_dict
    q, k, v, pos, *bias = args
    if flash_lowered(node, fn.device):
        keys, values = (x.tensor if isinstance(x, CacheView) else x for x in (k, v))
        length = k.length if isinstance(k, CacheView) else keys.ty.shape.values[2]
        return _flash(fn, node, _flash_spec(fn, node, paged=False), [q, keys, values, pos, relax.prim_value(length)])
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


def _scores_to_values(fn: _Fn, node: Node, s: relax.Expr, pos: relax.Expr,
                      values: Callable[[relax.Expr], relax.Expr]) -> relax.Expr:
    """Materialised scores -> scale, softcap, causal mask, softmax (f32) -> probabilities in v's
    dtype -> `values(probs)` (the value product's f32 accumulator) -> the node's dtype."""
    at = node.attr_dict
    if at["scale"] != 1.0:
        s = fn.emit(_scale(s, at["scale"]))
    if at["softcap"]:
        s = fn.emit(_softcap(s, at["softcap"]))
    s = fn.te(kernels.causal_mask, s, pos, window=at["window"], bidirectional=False)
    v_dtype = TVM_DTYPES[fn.hir.node(node.inputs[2]).type.dtype]
    probs = fn.emit(_as(fn.emit(relax.op.nn.softmax(s, axis=-1)), v_dtype))
    return _rounded(node, values(probs))


def _paged_attention(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """The flash kernel on CPU; GPU targets get the materialised form (scores over every
    position a page-table row can address, masked), which dlight schedules."""
    q, k_pages, v_pages, table, seq, pos = args
    if fn.device == "cpu":
        return _flash(fn, node, _flash_spec(fn, node, paged=True), [q, k_pages, v_pages, pos, table, seq])
    s = fn.te(flash_attention.paged_scores, q, k_pages, table, seq)
    return _scores_to_values(fn, node, s, pos,
                             lambda p: fn.te(flash_attention.paged_values, p, v_pages, table, seq))


def _paged_kv_write(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """In place (`call_tir_inplace`): the pool is an engine-owned buffer, so a step costs its new
    rows; the graph must read the pool only through this node's output (as GemmaFlow builds it)."""
    t = node.type
    kernel = flash_attention.paged_kv_write(TVM_DTYPES[t.dtype], eval_dim(t.shape[2], {}), eval_dim(t.shape[3], {}))
    gv = fn.bb.add_func(kernel, f"paged_kv_write_{TVM_DTYPES[t.dtype]}_{t.shape[2]}_{t.shape[3]}")
    return relax.call_tir_inplace(gv, args, 0, fn.ty(t))


def _add_rmsnorm(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    at = node.attr_dict
    total = fn.emit(relax.op.add(args[0], args[1]))
    normed = fn.emit(_rmsnorm(fn, total, args[2] if len(args) > 2 else None, at["eps"], at["offset"],
                              node.type.shape[-1]))
    return relax.Tuple([normed, total])


_STEPS: dict[str, Callable[[_Fn, relax.Expr, relax.Expr | None, float | None], relax.Expr]] = {
    "add": lambda fn, y, o, v: relax.op.add(y, _as(o, _dtype(y))),
    "mul": lambda fn, y, o, v: relax.op.multiply(y, _as(o, _dtype(y))),
    "scale": lambda fn, y, o, v: _scale(y, v),  # type: ignore[arg-type]  # parse_step: these steps carry a value
    "softcap": lambda fn, y, o, v: _softcap(y, v),  # type: ignore[arg-type]  # (as "scale")
    "gelu_tanh": lambda fn, y, o, v: _gelu(fn, y),
}


def _contraction(fn: _Fn, x: relax.Expr, w: relax.Expr | WeightView) -> relax.Expr:
    """`x @ w.T` as a kernel's float32 accumulator; a weight in a kernel layout or quantized is
    read (and decoded) inside the kernel (`weight_kernels.py`)."""
    if isinstance(w, WeightView):
        return fn.te(weight_kernels.contraction, x, w.tensor, layout=w.layout, fmt=w.format.name if w.format else "",
                     row_tile=fn.kernel.gemm_rows, chains=fn.kernel.gemv_chains)
    return fn.te(kernels.linear, x, w)


def _embed(fn: _Fn, node: Node, table: relax.Expr | WeightView, ids: relax.Expr) -> relax.Expr:
    """Rows of the table; one in a kernel layout or quantized is read (decoded) row by row."""
    if isinstance(table, WeightView):
        return fn.te(weight_kernels.lookup, table.tensor, ids, layout=table.layout,
                     fmt=table.format.name if table.format else "", dtype=TVM_DTYPES[node.type.dtype],
                     k=eval_dim(node.type.shape[-1], {}))
    return relax.op.take(table, ids, axis=0)


def _linear_epilogue(fn: _Fn, node: Node, args: list[relax.Expr]) -> relax.Expr:
    """The steps run on the linear's accumulator (float32 for f16 / bf16 operands, operands
    widened to it) and the result is rounded once, as the interpreter does."""
    y = _contraction(fn, args[0], args[1])
    operands = list(args[2:])
    for step in node.attr("steps"):
        kind, value = parse_step(step)
        y = fn.emit(_STEPS[kind](fn, y, operands.pop(0) if EPILOGUE_STEPS[kind] else None, value))
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
    top = fn.te(kernels.topk, probs, top_k)  # not relax.op.topk: see kernels.topk
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
    Op.EMBED: lambda fn, n, a: _embed(fn, n, a[0], a[1]),
    Op.SCALE: lambda fn, n, a: _scale(a[0], n.attr("value")),
    Op.ADD: lambda fn, n, a: relax.op.add(a[0], a[1]),
    Op.MUL: lambda fn, n, a: relax.op.multiply(a[0], a[1]),
    Op.RMSNORM: lambda fn, n, a: _rmsnorm(fn, a[0], a[1] if len(a) > 1 else None, n.attr("eps"), n.attr("offset"),
                                          n.type.shape[-1]),
    Op.LINEAR: lambda fn, n, a: _rounded(n, _contraction(fn, a[0], a[1])),
    Op.GELU_TANH: lambda fn, n, a: _gelu(fn, a[0]),
    Op.SOFTCAP: lambda fn, n, a: _softcap(a[0], n.attr("cap")),
    Op.RESHAPE: lambda fn, n, a: relax.op.reshape(a[0], fn.shape(tuple(attr_dim(d) for d in n.attr("shape")))),
    Op.TRANSPOSE: lambda fn, n, a: relax.op.permute_dims(a[0], list(n.attr("perm"))),
    Op.REPEAT_KV: lambda fn, n, a: relax.op.repeat(a[0], n.attr("repeats"), axis=1),
    Op.ROPE: lambda fn, n, a: fn.te(kernels.rope, a[0], a[1], a[2]),
    Op.ROPE_TABLE: lambda fn, n, a: fn.te(kernels.rope_from_table, a[0], a[1], a[2]),
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
    Op.PAGED_KV_WRITE: _paged_kv_write,
    Op.PAGED_ATTENTION: _paged_attention,
}



def lower_const(fn: _Fn, node: Node) -> relax.Expr:
    shape = eval_shape(node.type.shape, {})  # a const's shape is static
    return relax.const(np.asarray(node.attr("value"), dtype=node.type.dtype.numpy).reshape(shape))

