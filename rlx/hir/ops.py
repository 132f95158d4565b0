"""The HIR op set: one table row per op with its arity, attributes and type rule.

Ops are as coarse as the model (RMSNorm, Linear, RoPE) so that fusion patterns read like the
model, and fine where fusion has work to do (attention is scores -> scale -> softcap -> mask ->
softmax -> value product until `fuse-attention` folds it into one op).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlx.hir.dtypes import DType
from rlx.hir.shapes import Dim, Shape, SymDim, add_dims, eval_dim, parse_dim
from rlx.hir.tensor_type import TensorType


class Op(enum.Enum):
    INPUT = "input"
    PARAM = "param"
    CONST = "const"
    EMBED = "embed"
    SCALE = "scale"
    ADD = "add"
    MUL = "mul"
    RMSNORM = "rms_norm"
    LINEAR = "linear"
    GELU_TANH = "gelu_tanh"
    SOFTCAP = "softcap"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    REPEAT_KV = "repeat_kv"
    ROPE = "rope"
    ROPE_TABLE = "rope_table"  # rope reading a folded cos | sin table (fold-rope, never the frontend)
    MATMUL = "matmul"
    CAUSAL_MASK = "causal_mask"
    SOFTMAX = "softmax"
    CONCAT = "concat"
    SLICE = "slice"
    CAST = "cast"
    MOE = "moe"
    # fused ops, produced by the fusion passes (never by the frontend)
    ATTENTION = "attention"
    ADD_RMSNORM = "add_rms_norm"
    RESULT = "result"
    GEGLU = "geglu"
    LINEAR_EPILOGUE = "linear_epilogue"
    # the paged KV cache of a ragged batched step (runtime/paged_model.py), built by the frontend
    PAGED_KV_WRITE = "paged_kv_write"
    PAGED_ATTENTION = "paged_attention"


class TypeRuleError(ValueError):
    """Inputs or attrs do not fit an op's type rule; verify() turns it into an HIRError."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeRuleError(msg)


def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    out: list[Dim] = []
    ra, rb = list(reversed(a)), list(reversed(b))
    for i in range(max(len(a), len(b))):
        da = ra[i] if i < len(ra) else 1
        db = rb[i] if i < len(rb) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise TypeRuleError(f"shapes {a} and {b} do not broadcast (dim {da} vs {db})")
    return tuple(reversed(out))


def attr_dim(value: int | str) -> Dim:
    """Shape attrs hold ints or symbol strings so that they stay JSON values."""
    return value if isinstance(value, int) else parse_dim(value)


def _same_numel(a: Shape, b: Shape) -> bool:
    """Symbolic element-count check by evaluating both shapes at two symbol assignments."""
    symbols = {s for d in (*a, *b) if isinstance(d, SymDim) for s in d.symbols}
    for probe in (3, 7):
        env = dict.fromkeys(symbols, probe)
        na = nb = 1
        for d in a:
            na *= eval_dim(d, env)
        for d in b:
            nb *= eval_dim(d, env)
        if na != nb:
            return False
    return True


# ---- type rules: (input types, attrs) -> output type; None means "declared on the node" ----
TypeRule = Callable[[Sequence[TensorType], Mapping[str, Any]], TensorType | None]


def _declared(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> None:
    return None


def _same_as_first(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    _need(ins[0].dtype.is_float, f"expects a float input, got {ins[0]}")
    return ins[0]


def _embed(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    table, ids = ins
    _need(table.rank == 2, f"table must be [vocab, hidden], got {table}")
    _need(ids.dtype.is_int, f"ids must be integer, got {ids}")
    return TensorType(table.dtype, (*ids.shape, table.shape[1]))


def _binary(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    a, b = ins
    _need(a.dtype == b.dtype, f"dtype mismatch {a} vs {b}")
    return TensorType(a.dtype, broadcast_shapes(a.shape, b.shape))


def _rmsnorm(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x = ins[0]
    _need(x.dtype.is_float, f"expects a float input, got {x}")
    if len(ins) == 2:
        _need(ins[1].shape == (x.shape[-1],), f"weight {ins[1]} does not match last dim of {x}")
    return x


def _linear(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x, w = ins
    _need(w.rank == 2, f"weight must be [out, in], got {w}")
    _need(x.shape[-1] == w.shape[1], f"in-features mismatch: x {x} vs weight {w}")
    return TensorType(x.dtype, (*x.shape[:-1], w.shape[0]))


def _reshape(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    shape = tuple(attr_dim(d) for d in attrs["shape"])
    _need(_same_numel(ins[0].shape, shape), f"cannot reshape {ins[0]} to {list(attrs['shape'])}")
    return ins[0].with_shape(shape)


def _transpose(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    perm = tuple(attrs["perm"])
    _need(sorted(perm) == list(range(ins[0].rank)), f"perm {perm} is not a permutation of rank {ins[0].rank}")
    return ins[0].with_shape(tuple(ins[0].shape[p] for p in perm))


def _repeat_kv(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x = ins[0]
    _need(x.rank == 4, f"expects [batch, kv_heads, seq, head_dim], got {x}")
    _need(attrs["repeats"] >= 1, "repeats must be >= 1")
    heads = x.shape[1]
    _need(isinstance(heads, int), "kv_heads must be static")
    return x.with_shape((x.shape[0], heads * attrs["repeats"], *x.shape[2:]))


def _rope_operands(x: TensorType, pos: TensorType) -> None:
    _need(x.rank == 4, f"expects [batch, heads, seq, head_dim], got {x}")
    _need(pos.dtype.is_int and pos.rank == 2, f"positions must be int [batch, seq], got {pos}")


def _rope(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x, pos, inv_freq = ins
    _rope_operands(x, pos)
    _need(inv_freq.rank == 1 and x.shape[-1] == add_dims(inv_freq.shape[0], inv_freq.shape[0]),
          f"inv_freq {inv_freq} must hold head_dim/2 = {x.shape[-1]}/2 values")
    return x


def _rope_table(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    """The table is [positions, head_dim]: row p holds cos(p f) then sin(p f) (f: head_dim/2 values)."""
    x, pos, table = ins
    _rope_operands(x, pos)
    _need(table.dtype.is_float and table.rank == 2 and isinstance(table.shape[0], int)
          and table.shape[1] == x.shape[-1],
          f"table {table} must be float [positions, head_dim = {x.shape[-1]}] with a static position count")
    return x


def _matmul(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    a, b = ins
    _need(a.rank >= 2 and b.rank >= 2, f"matmul needs rank >= 2, got {a} and {b}")
    _need(a.dtype == b.dtype, f"dtype mismatch {a} vs {b}")
    _need(a.shape[-1] == b.shape[-2], f"contraction mismatch {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(a.dtype, (*batch, a.shape[-2], b.shape[-1]))


def _mask(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    scores, qpos = ins
    _need(scores.rank == 4, f"scores must be [batch, heads, q, k], got {scores}")
    _need(qpos.dtype.is_int and qpos.shape == (scores.shape[0], scores.shape[2]),
          f"q positions {qpos} must be int [batch, q] of scores {scores}")
    _need(attrs["window"] >= 0, "window must be >= 0 (0: no window)")
    return scores


def _concat(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    a = ins[0]
    axis = attrs["axis"] % a.rank
    _need(not a.quant or axis != a.rank - 1, f"quantized {a} can only be concatenated along whole rows")
    for b in ins[1:]:
        _need(a.rank == b.rank and a.dtype == b.dtype and a.quant == b.quant, f"concat of {a} and {b}")
        for i, (da, db) in enumerate(zip(a.shape, b.shape, strict=True)):
            _need(i == axis or da == db, f"concat dims differ off axis {axis}: {a} vs {b}")
    shape = list(a.shape)
    shape[axis] = add_dims(*(t.shape[axis] for t in ins))
    return a.with_shape(tuple(shape))


def _slice(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x = ins[0]
    axis, start, stop = attrs["axis"] % x.rank, attrs["start"], attrs["stop"]
    dim = x.shape[axis]
    if start < 0 and stop is None:
        size: Dim = -start
    else:
        _need(start >= 0 and isinstance(stop, int) and stop > start, f"slice [{start}:{stop}] not supported")
        _need(not isinstance(dim, int) or stop <= dim, f"slice stop {stop} past dim {dim}")
        size = stop - start
    shape = list(x.shape)
    shape[axis] = size
    return x.with_shape(tuple(shape))


def _cast(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    _need(not ins[0].is_quantized, f"cannot cast quantized {ins[0]}: only the ops that read blocks take it")
    return ins[0].with_dtype(DType.parse(attrs["dtype"]))


def _moe(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x, router_x, proj, per_expert, gate_up, down = ins
    experts, top_k = attrs["num_experts"], attrs["top_k"]
    hidden = x.shape[-1]
    _need(router_x.shape == x.shape, f"router input {router_x} must match x {x}")
    _need(proj.shape == (experts, hidden), f"router proj {proj} must be [{experts}, {hidden}]")
    _need(per_expert.shape == (experts,), f"per-expert scale {per_expert} must be [{experts}]")
    _need(gate_up.rank == 3 and gate_up.shape[0] == experts and gate_up.shape[2] == hidden,
          f"gate_up {gate_up} must be [{experts}, 2*I, {hidden}]")
    _need(down.rank == 3 and down.shape[0] == experts and down.shape[1] == hidden,
          f"down {down} must be [{experts}, {hidden}, I]")
    _need(0 < top_k <= experts, f"top_k {top_k} must be in 1..{experts}")
    return x


MASK_KINDS = ("causal", "bidirectional", "none")
# ops with extra results: the node's value is result 0; `result{index=i}` nodes read the others
MULTI_RESULT = frozenset({"add_rms_norm"})


def _attention(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    q, k, v, pos, *bias = ins
    _need(q.rank == k.rank == v.rank == 4, f"q/k/v must be [batch, heads, seq, head_dim]: {q}, {k}, {v}")
    hq, hk = q.shape[1], k.shape[1]
    _need(isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0, f"q heads {hq} not a multiple of kv {hk}")
    _need(k.shape == v.shape and q.shape[-1] == k.shape[-1], f"k {k} / v {v} do not fit q {q}")
    _need(pos.dtype.is_int and pos.shape == (q.shape[0], q.shape[2]), f"positions {pos} must be [batch, q]")
    _need(attrs["mask"] in MASK_KINDS, f"mask {attrs['mask']!r} not in {MASK_KINDS}")
    for b in bias:
        _need(b.rank == 4 and b.shape[-1] == k.shape[2], f"bias {b} must be [batch, 1, q, k]")
    return q.with_shape((*q.shape[:3], v.shape[-1]))


def _paged_operands(pages: TensorType, rows: TensorType, table: TensorType, seq: TensorType,
                    pos: TensorType) -> None:
    """A page pool [PAGES, Hk, PAGE, D] (PAGE static) and the ragged step's addressing: `rows`
    [1, H, T, D] (T tokens as the sequence axis), page_table int [SEQS, MAX_PAGES], token_seq int
    [T], positions int [1, T]."""
    _need(pages.rank == 4 and isinstance(pages.shape[2], int) and pages.dtype.is_float,
          f"pages must be float [pages, kv_heads, PAGE (static), head_dim], got {pages}")
    _need(rows.rank == 4 and rows.shape[0] == 1, f"expects [1, heads, tokens, head_dim], got {rows}")
    tokens = rows.shape[2]
    _need(table.dtype.is_int and table.rank == 2, f"page_table must be int [seqs, max_pages], got {table}")
    _need(seq.dtype.is_int and seq.shape == (tokens,), f"token_seq {seq} must be int [{tokens}]")
    _need(pos.dtype.is_int and pos.shape == (1, tokens), f"positions {pos} must be int [1, {tokens}]")


def _paged_kv_write(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    pages, new, table, seq, pos = ins
    _paged_operands(pages, new, table, seq, pos)
    _need(new.dtype == pages.dtype and new.shape[1] == pages.shape[1] and new.shape[3] == pages.shape[3],
          f"new rows {new} do not fit the pages {pages}")
    return pages


def _paged_attention(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    q, k, v, table, seq, pos = ins
    _paged_operands(k, q, table, seq, pos)
    hq, hk = q.shape[1], k.shape[1]
    _need(isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0, f"q heads {hq} not a multiple of kv {hk}")
    _need(v.rank == 4 and v.shape[:3] == k.shape[:3] and v.dtype == k.dtype and q.shape[3] == k.shape[3],
          f"k pages {k} / v pages {v} do not fit q {q}")
    _need(attrs["window"] >= 0, "window must be >= 0 (0: no window)")
    return q.with_shape((*q.shape[:3], v.shape[3]))


def _add_rmsnorm(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    a, b, *w = ins
    _need(a == b, f"residual add of {a} and {b} (the fused op needs equal types)")
    return _rmsnorm([a, *w], attrs)


def _result(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    _need(attrs["index"] == 1, "only result index 1 (the residual sum of add_rms_norm) exists")
    return ins[0]


def _geglu(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    if len(ins) == 2:
        return _binary(ins, attrs)
    x = ins[0]
    last = x.shape[-1]
    _need(isinstance(last, int) and last % 2 == 0, f"packed gate|up {x} needs an even last dim")
    return x.with_shape((*x.shape[:-1], last // 2))  # type: ignore[operator]  # _need: last is an int


EPILOGUE_STEPS = {"add": 1, "mul": 1, "scale": 0, "softcap": 0, "gelu_tanh": 0}


def parse_step(step: str) -> tuple[str, float | None]:
    kind, _, value = step.partition("=")
    return kind, float(value) if value else None


def _linear_epilogue(ins: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    out = _linear(ins[:2], attrs)
    operands = list(ins[2:])
    for step in attrs["steps"]:
        kind, value = parse_step(step)
        _need(kind in EPILOGUE_STEPS, f"unknown epilogue step {step!r} (known: {sorted(EPILOGUE_STEPS)})")
        _need((value is not None) == (kind in ("scale", "softcap")), f"step {step!r}: scale/softcap take =value")
        if EPILOGUE_STEPS[kind]:
            _need(bool(operands), f"step {step!r} needs an operand")
            out = _binary([out, operands.pop(0)], attrs)
    _need(not operands, f"{len(operands)} epilogue operand(s) left unused")
    return out


class Precision(enum.Enum):
    """How an op takes part in mixed precision (`rlx/passes/precision.py`): `compute` ops run in their
    layer's compute dtype (f16 / bf16); `f32` ops are the numerically touchy ones, kept in float32
    when mixed precision is "auto"; `layout` ops move data and keep their input's dtype; leaves
    (inputs, params, consts) keep the dtype they are declared with."""

    COMPUTE = "compute"
    F32 = "f32"
    LAYOUT = "layout"
    LEAF = "leaf"


@dataclass(frozen=True)
class OpSpec:
    """`attrs` maps each attr name to (accepted python types, default or REQUIRED). Each op's
    numpy implementation (`interpreter.IMPLS`) and TVM lowering (`targets.lowerings.LOWERINGS`)
    live with their layer; a test checks that every op has both."""

    arity: tuple[int, int]
    infer: TypeRule
    precision: Precision
    attrs: Mapping[str, tuple[tuple[type, ...], Any]] = field(default_factory=dict)
    quantized_inputs: frozenset[int] = frozenset()  # input positions that may be quantized weights


REQUIRED = object()
_NUM = (int, float)
_OPT_INT = (int, type(None))

OPS: dict[Op, OpSpec] = {
    Op.INPUT: OpSpec((0, 0), _declared, Precision.LEAF, {"name": ((str,), REQUIRED)}),
    # a weight, optionally derived at load time as `stored * scale + shift` (constant folding
    # moves the embedding scale and the (1+w) norm offset here, into the stored weight)
    Op.PARAM: OpSpec((0, 0), _declared, Precision.LEAF,
                     {"name": ((str,), REQUIRED), "scale": (_NUM, 1.0), "shift": (_NUM, 0.0)}),
    Op.CONST: OpSpec((0, 0), _declared, Precision.LEAF, {"value": ((tuple,), REQUIRED)}),
    Op.EMBED: OpSpec((2, 2), _embed, Precision.COMPUTE, quantized_inputs=frozenset({0})),
    Op.SCALE: OpSpec((1, 1), _same_as_first, Precision.COMPUTE, {"value": (_NUM, REQUIRED)}),
    Op.ADD: OpSpec((2, 2), _binary, Precision.COMPUTE),
    Op.MUL: OpSpec((2, 2), _binary, Precision.COMPUTE),
    Op.RMSNORM: OpSpec((1, 2), _rmsnorm, Precision.F32, {"eps": (_NUM, REQUIRED), "offset": (_NUM, 0.0)}),
    Op.LINEAR: OpSpec((2, 2), _linear, Precision.COMPUTE, quantized_inputs=frozenset({1})),
    Op.GELU_TANH: OpSpec((1, 1), _same_as_first, Precision.COMPUTE),
    Op.SOFTCAP: OpSpec((1, 1), _same_as_first, Precision.F32, {"cap": (_NUM, REQUIRED)}),
    Op.RESHAPE: OpSpec((1, 1), _reshape, Precision.LAYOUT, {"shape": ((tuple,), REQUIRED)}),
    Op.TRANSPOSE: OpSpec((1, 1), _transpose, Precision.LAYOUT, {"perm": ((tuple,), REQUIRED)}),
    Op.REPEAT_KV: OpSpec((1, 1), _repeat_kv, Precision.LAYOUT, {"repeats": ((int,), REQUIRED)}),
    Op.ROPE: OpSpec((3, 3), _rope, Precision.F32),
    # x, positions, a [positions, head_dim] table of cos | sin per position (see passes/fold_rope.py)
    Op.ROPE_TABLE: OpSpec((3, 3), _rope_table, Precision.F32),
    Op.MATMUL: OpSpec((2, 2), _matmul, Precision.COMPUTE),
    Op.CAUSAL_MASK: OpSpec((2, 2), _mask, Precision.F32, {"window": ((int,), 0), "bidirectional": ((bool,), False)}),
    Op.SOFTMAX: OpSpec((1, 1), _same_as_first, Precision.F32),
    Op.CONCAT: OpSpec((2, 8), _concat, Precision.COMPUTE, {"axis": ((int,), REQUIRED)},
                      quantized_inputs=frozenset(range(8))),  # rows of one format (fused projections)
    Op.SLICE: OpSpec((1, 1), _slice, Precision.LAYOUT, {"axis": ((int,), REQUIRED), "start": ((int,), REQUIRED),
                                      "stop": (_OPT_INT, None)}),
    Op.CAST: OpSpec((1, 1), _cast, Precision.LAYOUT, {"dtype": ((str,), REQUIRED)}),
    Op.MOE: OpSpec((6, 6), _moe, Precision.COMPUTE, {"num_experts": ((int,), REQUIRED), "top_k": ((int,), REQUIRED)}),
    # q, k, v (un-repeated KV heads), positions[, additive bias...]
    Op.ATTENTION: OpSpec((4, 6), _attention, Precision.COMPUTE, {"scale": (_NUM, 1.0), "softcap": (_NUM, 0.0),
                                              "window": ((int,), 0), "mask": ((str,), "causal")}),
    # norm(a + b) [* (offset + w)]; the sum a + b is `result{index=1}` of this node
    Op.ADD_RMSNORM: OpSpec((2, 3), _add_rmsnorm, Precision.F32, {"eps": (_NUM, REQUIRED), "offset": (_NUM, 0.0)}),
    Op.RESULT: OpSpec((1, 1), _result, Precision.LAYOUT, {"index": ((int,), REQUIRED)}),
    # gelu_tanh(gate) * up, from two values or one packed [.., gate | up] value
    Op.GEGLU: OpSpec((1, 2), _geglu, Precision.COMPUTE),
    # linear, then elementwise steps ("add", "mul" take the next operand; "scale=v", "softcap=v", "gelu_tanh")
    Op.LINEAR_EPILOGUE: OpSpec((2, 6), _linear_epilogue, Precision.COMPUTE, {"steps": ((tuple,), REQUIRED)},
                               quantized_inputs=frozenset({1})),
    # pages, new [1, Hk, T, D], page_table, token_seq, positions -> pages with the T rows written
    # at (page_table[token_seq[t], p // PAGE], p % PAGE), p = positions[0, t] (in place when compiled)
    Op.PAGED_KV_WRITE: OpSpec((5, 5), _paged_kv_write, Precision.COMPUTE),
    # q [1, Hq, T, D], k_pages, v_pages, page_table, token_seq, positions: token t attends over its
    # sequence's positions max(0, p - window + 1)..p (causal; GQA by index, as `attention`)
    Op.PAGED_ATTENTION: OpSpec((6, 6), _paged_attention, Precision.COMPUTE,
                               {"scale": (_NUM, 1.0), "softcap": (_NUM, 0.0), "window": ((int,), 0)}),
}


def complete_attrs(op: Op, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject unknown or missing attrs, so nodes always carry every attr."""
    spec = OPS[op]
    unknown = set(attrs) - set(spec.attrs)
    if unknown:
        raise TypeRuleError(f"{op.value}: unknown attr(s) {sorted(unknown)} (known: {sorted(spec.attrs)})")
    out: dict[str, Any] = {}
    for name, (types, default) in spec.attrs.items():
        if name in attrs:
            value = attrs[name]
        elif default is REQUIRED:
            raise TypeRuleError(f"{op.value}: missing required attr {name!r}")
        else:
            value = default
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise TypeRuleError(f"{op.value}: attr {name}={value!r} must be {'/'.join(t.__name__ for t in types)}")
        out[name] = value
    return out
