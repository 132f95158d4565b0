"""Reference interpreter: runs any HIR with numpy, one implementation per op.

It is the ground truth for pass tests (numbers before and after a rewrite must agree) and the
`reference` pseudo-target of `rlx run`.

Dtypes: every value is held in its node's dtype (float16 as numpy's own, bfloat16 as
`ml_dtypes.bfloat16`, see `DType.numpy`), so a graph the `precision` pass rewrote shows the
roundings its types say, and only those. Each op reads its inputs as they are and rounds its
result once to the node's dtype (`Interpreter.run`); in between, contractions (linear, matmul,
the epilogue's linear, attention's two products, the MoE experts) accumulate in float32, as GPU
tensor cores and the TVM lowering (`kernels.py`) do, and composite ops (norms, softmax, softcap,
RoPE, gelu, attention, MoE) compute in float32 (softmax, norms and RoPE exactly as transformers
does in eager float32). Single elementwise ops (add, mul, concat) run natively in the dtype. A
float32 graph computes exactly what it did before dtypes were honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from rlx.errors import HIRError
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR, Node, param_key, weight_only
from rlx.hir.ops import EPILOGUE_STEPS, Op, attr_dim, parse_step
from rlx.hir.quant import QuantFormat, QuantizedArray, dequantized, quant_format
from rlx.hir.shapes import bind_shape, eval_dim, eval_shape

F32 = np.float32


def masked_value(dtype: np.dtype | str) -> float:
    """What masked scores become: transformers fills them with dtype-min, not -inf."""
    return float(ml_dtypes.finfo(dtype).min)


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(F32, copy=False)


def _dense(w: np.ndarray | QuantizedArray) -> np.ndarray:
    """A weight as float values: a quantized one dequantized (once per array, kept with it: the
    reference engine reads every weight each step)."""
    return dequantized(w) if isinstance(w, QuantizedArray) else w


def _embed(table: np.ndarray | QuantizedArray, ids: np.ndarray) -> np.ndarray:
    """Rows of the table; a quantized table dequantizes only the rows it is asked for."""
    if isinstance(table, QuantizedArray):
        return table.rows(ids).dequantize()
    return table[ids]


def _concat(values: list[Any], axis: int) -> Any:
    if isinstance(values[0], QuantizedArray):  # whole rows of one format: the blocks concatenate
        return QuantizedArray(values[0].format, np.concatenate([v.blocks for v in values], axis=axis))
    return np.concatenate(values, axis=axis)


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a @ b` accumulated in float32 whatever the operand dtypes (the caller rounds the result)."""
    return np.matmul(_f32(a), _f32(b))

# inputs: arrays (a linear's weight may be a QuantizedArray); a multi-result op returns a tuple
Impl = Callable[[list[Any], dict[str, Any], dict[str, int]], np.ndarray | tuple[np.ndarray, ...]]


def _rmsnorm(x: np.ndarray, w: np.ndarray | None, eps: float, offset: float) -> np.ndarray:
    x = x.astype(F32)
    y = x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps)))
    return y if w is None else y * (F32(offset) + w.astype(F32))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    x = _f32(x)
    c = F32(np.sqrt(2.0 / np.pi))
    return (F32(0.5) * x * (F32(1.0) + np.tanh(c * (x + F32(0.044715) * x * x * x)))).astype(F32)


def _rope_angles(pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """`pos * inv_freq` in float32 (one rounding, as transformers' rotary embedding): [*pos.shape, D/2]."""
    return pos.astype(F32)[..., None] * inv_freq.astype(F32)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`x * cos + rotate_half(x) * sin` (transformers' apply_rotary_pos_emb); cos / sin are
    [B, S, D/2], repeated over both halves of the head dim."""
    cos, sin = (np.concatenate([c, c], axis=-1)[:, None] for c in (cos, sin))  # [B,1,S,D]
    half = x.shape[-1] // 2
    x = _f32(x)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(F32)


def _rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    freqs = _rope_angles(pos, inv_freq)
    return _rotate(x, np.cos(freqs), np.sin(freqs))


def rope_cos_sin_table(inv_freq: np.ndarray, positions: int) -> np.ndarray:
    """The `rope_table` op's table, [positions, D]: row p is cos(p f) | sin(p f), computed by the
    same float32 operations as `rope`, so folding the table changes no bit of the result."""
    freqs = _rope_angles(np.arange(positions), inv_freq)
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1)


def _rope_from_table(x: np.ndarray, pos: np.ndarray, table: np.ndarray) -> np.ndarray:
    if pos.size and not 0 <= int(pos.min()) <= int(pos.max()) < len(table):
        raise HIRError(f"rope_table: positions {int(pos.min())}..{int(pos.max())} are outside the table's "
                       f"0..{len(table) - 1} (the graph's position bound)",
                       hint="bound the graph by the positions it sees (rlx compile --max-seq), or keep rope unfolded")
    rows = table[pos]  # [B, S, D]
    half = table.shape[-1] // 2
    return _rotate(x, rows[..., :half], rows[..., half:])


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(F32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _causal_mask(scores: np.ndarray, qpos: np.ndarray, window: int, bidirectional: bool) -> np.ndarray:
    q = qpos[:, None, :, None].astype(np.int64)
    k = np.arange(scores.shape[-1], dtype=np.int64)[None, None, None, :]
    visible = np.ones(np.broadcast_shapes(q.shape, k.shape), dtype=bool) if bidirectional else k <= q
    if window:
        visible &= (np.abs(q - k) < window) if bidirectional else (q - window < k)
    return np.where(visible, scores, masked_value(scores.dtype)).astype(scores.dtype)


def _moe(ins: list[np.ndarray], top_k: int) -> np.ndarray:
    """Token-choice top-k routing over real experts (each token runs only its k experts)."""
    x, router_x, proj, per_expert, gate_up, down = (a.astype(F32) for a in ins)
    lead = x.shape[:-1]
    xt, rt = x.reshape(-1, x.shape[-1]), router_x.reshape(-1, x.shape[-1])
    probs = _softmax(rt @ proj.T)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, top, axis=-1)
    weights = weights / weights.sum(axis=-1, keepdims=True) * per_expert[top]
    out = np.zeros_like(xt)
    inter = gate_up.shape[1] // 2
    for e in np.unique(top):
        tok, slot = np.nonzero(top == e)
        h = xt[tok] @ gate_up[e].T
        act = _gelu_tanh(h[:, :inter]) * h[:, inter:]
        out[tok] += (act @ down[e].T) * weights[tok, slot][:, None]
    return out.reshape(*lead, x.shape[-1])


def _attention(ins: list[np.ndarray], at: dict[str, Any]) -> np.ndarray:
    """The fused op, computed as the unfused chain the frontend emits. In a f16 / bf16 graph it is
    one kernel's worth of rounding: the scores stay float32 through scale, softcap, mask, bias and
    softmax, the probabilities are rounded to v's dtype for the value product (as flash attention
    and transformers' `softmax(..., dtype=float32).to(v.dtype)` do), which accumulates in f32."""
    q, k, v, pos, *bias = ins
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = _mm(q, np.swapaxes(k, -1, -2))
    if at["scale"] != 1.0:
        s = (s * F32(at["scale"])).astype(F32)
    if at["softcap"]:
        s = (np.tanh(s / F32(at["softcap"])) * F32(at["softcap"])).astype(F32)
    if at["mask"] != "none":
        s = _causal_mask(s, pos, at["window"], at["mask"] == "bidirectional")
    for b in bias:
        s = s + _f32(b)
    return _mm(_softmax(s).astype(v.dtype), v)


def _paged_kv_write(ins: list[np.ndarray]) -> np.ndarray:
    """A copy of the pool with each token's row written where its position lives (functional: the
    compiled kernel writes the engine's pool in place)."""
    pages, new, table, seq, pos = ins
    out = pages.copy()
    size = pages.shape[2]
    p = pos[0].astype(np.int64)
    out[table[seq, p // size], :, p % size, :] = np.swapaxes(new[0], 0, 1).astype(pages.dtype)
    return out


def _paged_attention(ins: list[np.ndarray], at: dict[str, Any]) -> np.ndarray:
    """The plain form, per sequence: its tokens' queries against its positions 0..max(p), gathered
    from the pages into a contiguous cache and run through `_attention` (causal, window, softcap),
    so paged and contiguous attention agree by construction."""
    q, k_pages, v_pages, table, seq, pos = ins
    size = k_pages.shape[2]
    out = np.zeros((*q.shape[:3], v_pages.shape[3]), dtype=F32)
    attrs = {"scale": at["scale"], "softcap": at["softcap"], "window": at["window"], "mask": "causal"}
    for n in np.unique(seq):
        rows = np.nonzero(seq == n)[0]
        keys = np.arange(int(pos[0, rows].max()) + 1)
        pages = table[n, keys // size]

        def gather(pool: np.ndarray, pages: np.ndarray = pages, keys: np.ndarray = keys) -> np.ndarray:
            return np.swapaxes(pool[pages, :, keys % size, :], 0, 1)[None]  # [1, Hk, keys, D]

        out[:, :, rows] = _attention([q[:, :, rows], gather(k_pages), gather(v_pages), pos[:, rows]], attrs)
    return out


def _add_rmsnorm(ins: list[np.ndarray], at: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    total = ins[0] + ins[1]
    return _rmsnorm(total, ins[2] if len(ins) > 2 else None, at["eps"], at["offset"]), total


def _geglu(ins: list[np.ndarray]) -> np.ndarray:
    if len(ins) == 1:
        half = ins[0].shape[-1] // 2
        ins = [ins[0][..., :half], ins[0][..., half:]]
    return _gelu_tanh(ins[0]) * ins[1]


_STEPS: dict[str, Callable[[np.ndarray, np.ndarray | None, float | None], np.ndarray]] = {
    "add": lambda y, o, v: y + o,
    "mul": lambda y, o, v: y * o,
    "scale": lambda y, o, v: (y * F32(v)).astype(F32),
    "softcap": lambda y, o, v: (np.tanh(y / F32(v)) * F32(v)).astype(F32),
    "gelu_tanh": lambda y, o, v: _gelu_tanh(y),
}


def _linear_epilogue(ins: list[np.ndarray], at: dict[str, Any]) -> np.ndarray:
    y = _mm(ins[0], _dense(ins[1]).T)
    operands = list(ins[2:])
    for step in at["steps"]:
        kind, value = parse_step(step)
        y = _STEPS[kind](y, operands.pop(0) if EPILOGUE_STEPS[kind] else None, value)
    return y


def _reshape(x: np.ndarray, attrs: dict[str, Any], env: dict[str, int]) -> np.ndarray:
    return x.reshape([eval_dim(attr_dim(d), env) for d in attrs["shape"]])


def _slice(x: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[attrs["axis"]] = slice(attrs["start"], attrs["stop"])
    return x[tuple(index)]


IMPLS: dict[Op, Impl] = {
    Op.EMBED: lambda a, at, env: _embed(a[0], a[1]),
    Op.SCALE: lambda a, at, env: (a[0] * F32(at["value"])).astype(F32),
    Op.ADD: lambda a, at, env: a[0] + a[1],
    Op.MUL: lambda a, at, env: a[0] * a[1],
    Op.RMSNORM: lambda a, at, env: _rmsnorm(a[0], a[1] if len(a) > 1 else None, at["eps"], at["offset"]),
    Op.LINEAR: lambda a, at, env: _mm(a[0], _dense(a[1]).T),
    Op.GELU_TANH: lambda a, at, env: _gelu_tanh(a[0]),
    Op.SOFTCAP: lambda a, at, env: (np.tanh(a[0] / F32(at["cap"])) * F32(at["cap"])).astype(F32),
    Op.RESHAPE: lambda a, at, env: _reshape(a[0], at, env),
    Op.TRANSPOSE: lambda a, at, env: np.ascontiguousarray(np.transpose(a[0], at["perm"])),
    Op.REPEAT_KV: lambda a, at, env: np.repeat(a[0], at["repeats"], axis=1),
    Op.ROPE: lambda a, at, env: _rope(a[0], a[1], a[2]),
    Op.ROPE_TABLE: lambda a, at, env: _rope_from_table(a[0], a[1], a[2]),
    Op.MATMUL: lambda a, at, env: _mm(a[0], a[1]),
    Op.CAUSAL_MASK: lambda a, at, env: _causal_mask(a[0], a[1], at["window"], at["bidirectional"]),
    Op.SOFTMAX: lambda a, at, env: _softmax(a[0]),
    Op.CONCAT: lambda a, at, env: _concat(a, at["axis"]),
    Op.SLICE: lambda a, at, env: _slice(a[0], at),
    Op.CAST: lambda a, at, env: a[0].astype(DType.parse(at["dtype"]).numpy),
    Op.MOE: lambda a, at, env: _moe(a, at["top_k"]),
    Op.ATTENTION: lambda a, at, env: _attention(a, at),
    Op.ADD_RMSNORM: lambda a, at, env: _add_rmsnorm(a, at),
    Op.GEGLU: lambda a, at, env: _geglu(a),
    Op.LINEAR_EPILOGUE: lambda a, at, env: _linear_epilogue(a, at),
    Op.PAGED_KV_WRITE: lambda a, at, env: _paged_kv_write(a),
    Op.PAGED_ATTENTION: lambda a, at, env: _paged_attention(a, at),
}

WeightSource = Mapping[str, np.ndarray] | Callable[[str], np.ndarray]
"""Float32 weights by stored name. A source may also offer `packed(name, format)`: the tensor's
blocks as stored, when it is stored in that quantized format (a GGUF's), else None; without it
(or with None) a quantized param is quantized from the float32 tensor."""


def _rounded(value: np.ndarray, dtype: DType) -> np.ndarray:
    """An op's result in its node's dtype: the one rounding a kernel storing it would do."""
    if isinstance(value, QuantizedArray):
        return value
    want = dtype.numpy
    return value if value.dtype == want else value.astype(want)


class Interpreter:
    """Runs an HIR; weights come from a mapping or a loader and are cached as float32 once (a
    param typed f16 / bf16 is converted from that copy; the `precision` pass instead keeps params
    f32 and casts them in the graph, which this interpreter recomputes on every run)."""

    def __init__(self, hir: HIR, weights: WeightSource | None = None,
                 quantized: dict[str, QuantizedArray] | None = None) -> None:
        """`quantized`: a cache of quantized params (by name, scale, shift and format) to share
        with other interpreters over the same weights, so each is quantized and dequantized once."""
        self.hir = hir
        self._order = hir.nodes()
        self._weights = weights if weights is not None else {}
        self._cache: dict[str, np.ndarray] = {}
        self._quantized: dict[str, QuantizedArray] = quantized if quantized is not None else {}
        # quantized values computed from weights alone (the q|k|v and gate|up concatenations of
        # the fusion passes): kept across runs, with their dequantized form (`dequantized`), so a
        # decode step does not concatenate and dequantize them again
        self._weight_only = weight_only(hir)
        self._kept: dict[str, QuantizedArray] = {}
        last_use: dict[str, int] = {}
        for step, node in enumerate(self._order):
            for i in node.inputs:
                last_use[i] = step
        self._last_use = last_use

    def weight(self, name: str) -> np.ndarray:
        if name not in self._cache:
            src = self._weights
            value = src(name) if callable(src) else src[name]
            self._cache[name] = np.ascontiguousarray(value, dtype=F32)
        return self._cache[name]

    def _float_param(self, name: str, scale: float, shift: float) -> np.ndarray:
        if (scale, shift) == (1.0, 0.0):
            return self.weight(name)
        key = f"{name}*{scale!r}+{shift!r}"
        if key not in self._cache:
            self._cache[key] = (self.weight(name) * F32(scale) + F32(shift)).astype(F32)
        return self._cache[key]

    def param(self, node: Node) -> np.ndarray | QuantizedArray:
        name, scale, shift = param_key(node)
        if node.type.is_quantized:
            return self._quantized_param(name, scale, shift, quant_format(node.type.quant))  # type: ignore[arg-type]  # is_quantized: quant is set
        return _rounded(self._float_param(name, scale, shift), node.type.dtype)

    def _quantized_param(self, name: str, scale: float, shift: float, fmt: QuantFormat) -> QuantizedArray:
        """The blocks as stored when the source has the tensor in this format (a GGUF's, never
        dequantized), else quantized here from the float32 tensor: the value rlx computes with."""
        key = f"{name}*{scale!r}+{shift!r}@{fmt.name}"
        if key not in self._quantized:
            packed = getattr(self._weights, "packed", None)
            blocks = packed(name, fmt) if packed is not None and (scale, shift) == (1.0, 0.0) else None
            if blocks is None:
                blocks = fmt.quantize(self._float_param(name, scale, shift))
            self._quantized[key] = QuantizedArray(fmt, blocks)
        return self._quantized[key]

    def _leaf(self, node: Node, feeds: Mapping[str, np.ndarray], env: dict[str, int]) -> np.ndarray | QuantizedArray:
        if node.op is Op.PARAM:
            return self.param(node)
        if node.op is Op.CONST:
            return np.asarray(node.attr("value"), dtype=node.type.dtype.numpy).reshape(
                eval_shape(node.type.shape, {}))  # a const's shape is static
        name = node.attr("name")
        if name not in feeds:
            raise HIRError(f"missing input {name!r} (graph inputs: {sorted(self.hir.inputs)})",
                           hint="feed every graph input")
        value = np.asarray(feeds[name])
        try:
            bind_shape(node.type.shape, value.shape, env, f"input {name}")
        except ValueError as e:
            raise HIRError(str(e), hint="feed inputs of the declared shapes") from None
        return value.astype(node.type.dtype.numpy)

    def run(self, feeds: Mapping[str, np.ndarray], *, env: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        env = dict(env or {})
        for node in self._order:  # bind every symbol from the inputs before anything runs
            if node.op is Op.INPUT and node.attr("name") in feeds:
                self._leaf(node, feeds, env)
        values: dict[str, Any] = {}  # arrays; a weight-only value may stay a QuantizedArray
        extra: dict[str, tuple[np.ndarray, ...]] = {}
        keep = set(self.hir.outputs.values())
        for step, node in enumerate(self._order):
            if node.op in (Op.INPUT, Op.PARAM, Op.CONST):
                values[node.id] = self._leaf(node, feeds, env)
            elif node.op is Op.RESULT:
                values[node.id] = _rounded(extra[node.inputs[0]][node.attr("index") - 1], node.type.dtype)
            elif node.id in self._kept:
                values[node.id] = self._kept[node.id]
            else:
                out = IMPLS[node.op]([values[i] for i in node.inputs], node.attr_dict, env)
                if isinstance(out, tuple):
                    values[node.id], extra[node.id] = _rounded(out[0], node.type.dtype), out[1:]
                else:
                    values[node.id] = _rounded(out, node.type.dtype)
                if node.id in self._weight_only and isinstance(values[node.id], QuantizedArray):
                    self._kept[node.id] = values[node.id]
            for i in set(node.inputs):
                if self._last_use[i] == step and i not in keep:
                    del values[i]
                    extra.pop(i, None)
        return {name: values[nid] for name, nid in self.hir.outputs.items()}

