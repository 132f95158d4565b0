"""TE computes for the HIR ops Relax has no operator for (or none we can schedule, or, like top-k,
one that calls a library an artifact's runtime-only TVM lacks).

Each is one TE stage (but top-k: k + 2, nothing fuses with it), so Relax's FuseOps can fuse
elementwise epilogues into it, and the contractions carry a known block name so that
`schedules.py` finds them after fusion (the contraction kind decides the schedule, see
`CONTRACTIONS`). Every compute mirrors the numpy reference in `rlx/hir/interpreter.py`, same
operation order where it matters. Dtypes follow the operands: contractions of f16 / bf16 operands
accumulate in float32 and return float32 (the lowering rounds to the node's dtype after any fused
epilogue, as the interpreter does), RoPE computes in float32 and rounds back, and masks fill with
the scores' dtype-min.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tvm import te, tirx, topi

from rlx.hir.interpreter import masked_value
from rlx.targets.weight_kernels import QLINEAR

# contraction block names -> operand layout: "nt" reduces over the last axis of both operands
# (x @ w.T: both rows contiguous), "nn" over the last axis of a and the second-to-last of b
LINEAR = "rlx_linear"
ATTN_SCORES = "rlx_attn_scores"
ATTN_VALUES = "rlx_attn_values"
MATMUL = "rlx_matmul"
MOE_GATE_UP = "rlx_moe_gate_up"
MOE_DOWN = "rlx_moe_down"
ROPE_COS, ROPE_SIN = "rlx_rope_cos", "rlx_rope_sin"
MATERIALIZED = frozenset({ROPE_COS, ROPE_SIN})  # stages the schedules keep (not inlined)
CONTRACTIONS: dict[str, str] = {
    LINEAR: "nt", ATTN_SCORES: "nt", MOE_GATE_UP: "nt", MOE_DOWN: "nt", QLINEAR: "nt",
    ATTN_VALUES: "nn", MATMUL: "nn",
}


ACCUMULATE = "float32"


def _f32(e: tirx.PrimExpr) -> tirx.PrimExpr:
    return e if e.dtype == ACCUMULATE else e.astype(ACCUMULATE)


def _product(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """One term of a contraction. Same-dtype float32 operands multiply as they are (the f32
    kernels are unchanged); anything else is widened to float32 first, so the sum accumulates in
    f32 whatever the storage dtype. The casts sit inside the reduction's expression, so each
    contraction stays one block that `schedules.py` finds by name."""
    return a * b if a.dtype == b.dtype == ACCUMULATE else _f32(a) * _f32(b)


def linear(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """`y[..., n] = sum_k x[..., k] * w[n, k]` (weights stay [out, in], as stored)."""
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    return te.compute((*x.shape[:-1], w.shape[0]),
                      lambda *i: te.sum(_product(x[(*i[:-1], k)], w[i[-1], k]), axis=k), name=LINEAR)


def _broadcast_index(index: Sequence[tirx.PrimExpr], shape: Sequence[tirx.PrimExpr],
                     out_shape: Sequence[tirx.PrimExpr]) -> list[tirx.PrimExpr]:
    """Index a (numpy-broadcast) batch prefix: size-1 dims read element 0."""
    lead = len(out_shape) - len(shape)
    return [tirx.const(0, i.dtype) if isinstance(d, tirx.IntImm) and d.value == 1 and not
            (isinstance(o, tirx.IntImm) and o.value == 1) else i
            for i, d, o in zip(index[lead:], shape, out_shape[lead:], strict=True)]


def matmul(a: te.Tensor, b: te.Tensor, out_batch: Sequence[tirx.PrimExpr]) -> te.Tensor:
    """`np.matmul` for rank >= 2 with broadcast batch dims (`out_batch`)."""
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    shape = (*out_batch, a.shape[-2], b.shape[-1])

    def body(*i: tirx.PrimExpr) -> tirx.PrimExpr:
        batch = i[:-2]
        ia = _broadcast_index(batch, a.shape[:-2], out_batch)
        ib = _broadcast_index(batch, b.shape[:-2], out_batch)
        return te.sum(_product(a[(*ia, i[-2], k)], b[(*ib, k, i[-1])]), axis=k)

    return te.compute(shape, body, name=MATMUL)


def attention_scores(q: te.Tensor, k: te.Tensor, length: tirx.PrimExpr | None = None,
                     start: tirx.PrimExpr | int = 0) -> te.Tensor:
    """`q @ k^T` per head; query head h reads KV head h // (Hq / Hk), so K is never repeated.
    With `length`, k is a cache buffer and only its rows start..length-1 are keys (score t is
    key start + t)."""
    group = int(q.shape[1]) // int(k.shape[1])
    d = te.reduce_axis((0, q.shape[-1]), name="d")
    keys = k.shape[2] if length is None else length - start
    return te.compute((q.shape[0], q.shape[1], q.shape[2], keys),
                      lambda b, h, s, t: te.sum(_product(q[b, h, s, d], k[b, h // group, start + t, d]), axis=d),
                      name=ATTN_SCORES)


def attention_values(p: te.Tensor, v: te.Tensor, start: tirx.PrimExpr | int = 0) -> te.Tensor:
    """`probs @ v` per head, with the same head grouping as `attention_scores`; v may be a
    cache buffer longer than the probabilities' key axis: probability t weighs row start + t."""
    group = int(p.shape[1]) // int(v.shape[1])
    t = te.reduce_axis((0, p.shape[-1]), name="t")
    return te.compute((p.shape[0], p.shape[1], p.shape[2], v.shape[3]),
                      lambda b, h, s, e: te.sum(_product(p[b, h, s, t], v[b, h // group, start + t, e]), axis=t),
                      name=ATTN_VALUES)


def rope(x: te.Tensor, pos: te.Tensor, inv_freq: te.Tensor) -> te.Tensor:
    """Rotate-half RoPE: `x * cos(p f) + rotate_half(x) * sin(p f)`, f repeated over both halves.
    cos and sin are computed once per (position, frequency) in their own stages (`MATERIALIZED`:
    kept by the schedules), not once per head and half: trig is the expensive part."""
    dim = x.shape[-1]
    half = dim // 2

    def trig(f: Callable[[tirx.PrimExpr], tirx.PrimExpr], name: str) -> te.Tensor:
        return te.compute((x.shape[0], x.shape[2], half),
                          lambda b, s, j: f(pos[b, s].astype("float32") * _f32(inv_freq[j])), name=name)

    cos, sin = trig(tirx.cos, ROPE_COS), trig(tirx.sin, ROPE_SIN)

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, s: tirx.PrimExpr, d: tirx.PrimExpr) -> tirx.PrimExpr:
        j = tirx.floormod(d, half)
        partner = _f32(x[b, h, s, tirx.floormod(d + half, dim)])
        rotated = tirx.Select(d < half, -partner, partner)
        out = _f32(x[b, h, s, d]) * cos[b, s, j] + rotated * sin[b, s, j]
        return out if x.dtype == ACCUMULATE else out.astype(x.dtype)

    return te.compute(x.shape, body, name="rlx_rope")


def gelu_tanh(x: te.Tensor) -> te.Tensor:
    """GELU (tanh form) in float32 with TVM's vectorisable rational tanh (`topi.fast_tanh`, max
    abs error 3.8e-7 against float64, measured over [-12, 12]; LLVM's tanh is a scalar libm call
    per element, ~10x slower)."""
    xf = te.compute(x.shape, lambda *i: _f32(x[i]), name="rlx_gelu_in")
    inner = te.compute(x.shape, lambda *i: tirx.const(0.7978845608028654, "float32")
                       * (xf[i] + tirx.const(0.044715, "float32") * xf[i] * xf[i] * xf[i]), name="rlx_gelu_inner")
    t = topi.fast_tanh(inner)
    return te.compute(x.shape, lambda *i: tirx.const(0.5, "float32") * xf[i] * (tirx.const(1.0, "float32") + t[i]),
                      name="rlx_gelu")


def _rotate_half_at(x: te.Tensor, b: tirx.PrimExpr, h: tirx.PrimExpr, s: tirx.PrimExpr,
                    d: tirx.PrimExpr) -> tirx.PrimExpr:
    """Element d of `rotate_half(x[b, h, s])`: `-x[d + D/2]` in the first half, `x[d - D/2]` in the second."""
    dim = x.shape[-1]
    partner = x[b, h, s, tirx.floormod(d + dim // 2, dim)]
    return tirx.Select(d < dim // 2, -partner, partner)


def rope_from_table(x: te.Tensor, pos: te.Tensor, table: te.Tensor) -> te.Tensor:
    """RoPE from a folded table (`passes/fold_rope.py`): row p of `table [P, D]` is cos(p f) | sin(p f).

    The row index is clamped into 0..P-1: positions past the graph's bound break its contract,
    and this way they read a wrong row instead of memory past the table. Computed in float32 (the
    table's dtype) and cast back to x's."""
    half = x.shape[-1] // 2
    last = table.shape[0] - 1

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, s: tirx.PrimExpr, d: tirx.PrimExpr) -> tirx.PrimExpr:
        p = tirx.max(tirx.min(pos[b, s].astype("int64"), last.astype("int64")), tirx.const(0, "int64"))
        j = tirx.floormod(d, half)
        out = (x[b, h, s, d].astype("float32") * table[p, j]
               + _rotate_half_at(x, b, h, s, d).astype("float32") * table[p, j + half])
        return out.astype(x.dtype)

    return te.compute(x.shape, body, name="rlx_rope_table")


def causal_mask(scores: te.Tensor, qpos: te.Tensor, window: int, bidirectional: bool,
                key_start: tirx.PrimExpr | int = 0) -> te.Tensor:
    """Keys sit at positions key_start..key_start+T-1; a query at q sees k <= q (and q - W < k
    with a window W); bidirectional: every key, or |q - k| < W with a window."""
    masked = tirx.const(masked_value(str(scores.dtype)), scores.dtype)

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, s: tirx.PrimExpr, t: tirx.PrimExpr) -> tirx.PrimExpr:
        q = qpos[b, s].astype("int64")
        k = (t + key_start).astype("int64")
        visible = tirx.const(True, "bool") if bidirectional else k <= q
        if window:
            near = (tirx.abs(q - k) < window) if bidirectional else (q - window < k)
            visible = tirx.all(visible, near)
        return tirx.Select(visible, scores[b, h, s, t], masked)

    return te.compute(scores.shape, body, name="rlx_causal_mask")


def moe_gate_up(x: te.Tensor, gate_up: te.Tensor, experts: te.Tensor) -> te.Tensor:
    """`h[n, j, i] = sum_c x[n, c] * gate_up[experts[n, j], i, c]`: each token reads only the
    weights of its k chosen experts (the gather happens inside the contraction)."""
    c = te.reduce_axis((0, x.shape[-1]), name="c")
    return te.compute((x.shape[0], experts.shape[1], gate_up.shape[1]),
                      lambda n, j, i: te.sum(_product(x[n, c], gate_up[experts[n, j], i, c]), axis=c),
                      name=MOE_GATE_UP)


def moe_down(act: te.Tensor, down: te.Tensor, experts: te.Tensor) -> te.Tensor:
    """`y[n, j, c] = sum_i act[n, j, i] * down[experts[n, j], c, i]` (per chosen expert slot)."""
    i = te.reduce_axis((0, act.shape[-1]), name="i")
    return te.compute((act.shape[0], act.shape[1], down.shape[1]),
                      lambda n, j, c: te.sum(_product(act[n, j, i], down[experts[n, j], c, i]), axis=i),
                      name=MOE_DOWN)


TOPK = "rlx_topk"


def _before(a: Sequence[tirx.PrimExpr], b: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
    """Whether (value, index) `a` sorts before `b`: larger value first, the lower index on ties
    (the order of numpy's `argsort(-x, kind="stable")`, which the interpreter routes with)."""
    return tirx.any(a[0] > b[0], tirx.all(a[0] == b[0], a[1] < b[1]))


def _first(a: Sequence[tirx.PrimExpr], b: Sequence[tirx.PrimExpr]) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """`_ARGMAX`'s combiner: whichever of the two sorts first."""
    keep = _before(a, b)
    return tirx.Select(keep, a[0], b[0]), tirx.Select(keep, a[1], b[1])


def _nothing(value_dtype: str, index_dtype: str) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """The identity of `_ARGMAX`: every real element, even -inf, sorts before it."""
    return tirx.const(float("-inf"), value_dtype), tirx.max_value(index_dtype)


# (value, index) -> the element that sorts first: a total order, so commutative and associative
_ARGMAX = te.comm_reducer(_first, _nothing, name="rlx_argmax")


def _next_pick(x: te.Tensor, prev: Sequence[te.Tensor] | None, name: str) -> list[te.Tensor]:
    """Per row of x, the first element (in `_before` order) that sorts after `prev` (its value,
    int64 index): one pass over the row, which makes k picks O(k * E) and needs no "taken" mask."""
    j = te.reduce_axis((0, x.shape[1]), name="j")
    nothing = _nothing(str(x.dtype), "int64")

    def body(n: tirx.PrimExpr) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
        item = (x[n, j], j.var.astype("int64"))
        if prev is not None:
            after = _before((prev[0][n], prev[1][n]), item)
            item = (tirx.Select(after, item[0], nothing[0]), tirx.Select(after, item[1], nothing[1]))
        return _ARGMAX(item, axis=j)

    return te.compute((x.shape[0],), body, name=name)


def topk(x: te.Tensor, k: int) -> list[te.Tensor]:
    """The k largest values of each row of `x [N, E]` and their int64 indices, largest first, ties
    to the lower index: `np.argsort(-x, kind="stable")[:, :k]`, so compiled MoE routing picks the
    interpreter's experts. Relax's `topk` would call TVM's sort library, which is not in the
    runtime-only library an artifact loads. This is k argmax passes per row (fine for E up to a
    few hundred), pass s skipping what sorts before pick s - 1; one block lays the indices out as
    [N, k] and the values are read back through them (two blocks: one writing both outputs
    defeats the schedule rules). `schedules.RowReduction` runs a row's passes and both outputs
    under one parallel row loop."""
    if isinstance(x.shape[1], tirx.IntImm) and not 0 < k <= x.shape[1].value:
        raise ValueError(f"top-{k} of {x.shape[1].value} values")
    picks: list[list[te.Tensor]] = []
    for s in range(k):
        picks.append(_next_pick(x, picks[-1] if picks else None, f"{TOPK}_{s}"))

    def index(n: tirx.PrimExpr, s: tirx.PrimExpr) -> tirx.PrimExpr:
        out = picks[-1][1][n]
        for t in range(k - 2, -1, -1):
            out = tirx.Select(s == t, picks[t][1][n], out)
        return out

    indices = te.compute((x.shape[0], k), index, name=f"{TOPK}_indices")
    values = te.compute((x.shape[0], k), lambda n, s: x[n, indices[n, s]], name=f"{TOPK}_values")
    return [values, indices]


KV_WRITE = "rlx_kv_write"


def kv_write(dtype: str, d: int) -> tirx.PrimFunc:
    """`cache[b, h, (offset + s) % CAP, :] = new[b, h, s, :]`, in place (called with
    `call_tir_inplace`): the cache buffer [B, H, CAP, D] is the caller's, so a step costs its new
    rows, not the cache. Modulo CAP: a sliding-window layer's cache may be a ring (`kv_cache.py`);
    any other buffer holds every position, where the modulo is the identity.
    One function per head size: a static row is copied in vectors. TE cannot express a write
    into an input, hence TVMScript."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, check_well_formed=False)
    def write(var_cache: T.handle, var_new: T.handle, offset: T.int64) -> None:
        T.func_attr({"tir.noalias": True})
        b, h, cap, s = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (b, h, cap, d), dtype)
        new = T.match_buffer(var_new, (b, h, s, d), dtype)
        with T.sblock("root"):
            for i, j, k, m in T.grid(b, h, s, d):
                with T.sblock(KV_WRITE):
                    vi, vj, vk, vm = T.axis.remap("SSSS", [i, j, k, m])
                    T.reads(new[vi, vj, vk, vm])
                    T.writes(cache[vi, vj, T.floormod(offset + vk, cap), vm])
                    cache[vi, vj, T.floormod(offset + vk, cap), vm] = new[vi, vj, vk, vm]

    return write
