"""HIR -> Relax IRModule: one Relax function per graph, one lowering per HIR op (`LOWERINGS`).

Calling convention of every function (`Signature` records it for the runtime):
- parameters: the graph inputs sorted by name (natural order: `x.2` before `x.10`), then the
  KV cache buffers (`kv_cache.py`: `cache_k.i` [B, H, KV_CAP, D] per `present_k.i` output, or a
  ring of `KV_WINDOW_<W>` rows on a sliding-window layer on CPU,
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

Each op's Relax comes from `lowerings.LOWERINGS`. Every value is pinned to the HIR's declared
type (a match_cast where Relax infers a less simple shape), so shapes downstream stay the HIR's.
A weight's cast to f16 / bf16 is weight-only, so it is a load-time param like any other.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from rlx.errors import HIRError
from rlx.hir.graph import HIR, param_key, weight_only
from rlx.hir.interpreter import Interpreter, WeightSource
from rlx.hir.ops import Op
from rlx.hir.quant import QuantizedArray, quant_format
from rlx.hir.shapes import dim_symbols, eval_dim
from rlx.hir.tensor_type import TensorType
from rlx.targets import kernels, kv_cache, layouts
from rlx.targets.function_builder import TVM_DTYPES, CacheView, FunctionBuilder, WeightView
from rlx.targets.lowerings import CACHE_READERS, LOWERINGS, flash_lowered, lower_const
from rlx.targets.machine import CONSERVATIVE_PARAMS, KernelParams, kernel_params
from rlx.targets.presets import ResolvedTarget


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
    type: TensorType  # as the graph sees it: a quantized weight is q4_0[N, K] (rlx.hir.quant)
    program: HIR
    layout: str = layouts.PLAIN  # how the function takes it (`layouts.py`)

    @property
    def stored(self) -> tuple[str, ...]:
        """The stored tensors it reads."""
        return tuple(sorted({param_key(n)[0] for n in self.program.params.values()}))

    @property
    def physical(self) -> TensorType:
        """What the function takes: the weight in its layout (a quantized one as uint8 blocks)."""
        return layouts.physical_type(self.type, self.layout)

    def materialize(self, load: WeightSource) -> np.ndarray:
        """Compute it on the host from the stored tensors (`load(name)`; `load.packed` gives a
        GGUF's blocks as stored), as `physical` says."""
        value = Interpreter(self.program, load).run({})["value"]
        plain = value.blocks if isinstance(value, QuantizedArray) else np.asarray(value, dtype=self.type.dtype.numpy)
        return layouts.pack(plain, self.layout, self.type.quant)


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


def _param_nodes(hir: HIR, chosen: Mapping[str, str] | None = None) -> dict[str, ParamSpec]:
    """Weight-only nodes the rest of the graph reads (or that are outputs), by node id; `chosen`
    gives their layouts by key (default: plain)."""
    weights = weight_only(hir)
    used = {i for n in hir.nodes() if n.id not in weights for i in n.inputs} | set(hir.outputs.values())
    memo: dict[str, str] = {}
    specs = {}
    for nid in sorted(weights & used):
        key = _expr_key(hir, nid, memo)
        specs[nid] = ParamSpec(key, hir.node(nid).type, _program(hir, nid), (chosen or {}).get(key, layouts.PLAIN))
    return specs


def weight_readers(hir: HIR) -> dict[str, set[tuple[Op, int]]]:
    """For each weight-only value the kernels read: the (op, input position) pairs reading it."""
    weights = weight_only(hir)
    out: dict[str, set[tuple[Op, int]]] = {}
    memo: dict[str, str] = {}
    for n in hir.nodes():
        if n.id in weights:
            continue
        for pos, i in enumerate(n.inputs):
            if i in weights:
                out.setdefault(_expr_key(hir, i, memo), set()).add((n.op, pos))
    for nid in set(hir.outputs.values()) & weights:
        out.setdefault(_expr_key(hir, nid, memo), set()).add((Op.INPUT, -1))  # an output: keep it plain
    return out


def choose_layouts(graphs: Mapping[str, HIR], device: str) -> dict[str, str]:
    """One layout per weight key, from every function that reads it (they share one tensor)."""
    readers: dict[str, set[tuple[Op, int]]] = {}
    types: dict[str, TensorType] = {}
    for hir in graphs.values():
        for key, found in weight_readers(hir).items():
            readers.setdefault(key, set()).update(found)
        memo: dict[str, str] = {}
        types.update((_expr_key(hir, nid, memo), hir.node(nid).type) for nid in weight_only(hir))
    return {key: layouts.choose(types[key], found, device) for key, found in readers.items()}


def cache_plan(hir: HIR, device: str) -> tuple[kv_cache.CacheSlot, ...]:
    """The graph's cache slots on `device`: rings where only its flash kernel reads them."""
    return kv_cache.plan(hir, modular=functools.partial(flash_lowered, device=device))


def signature_of(hir: HIR, function: str, chosen: Mapping[str, str] | None = None, device: str = "cpu") -> Signature:
    slots = cache_plan(hir, device)
    replaced = {s.past_input for s in slots}
    inputs = tuple((name, node.type) for name, node in sorted(hir.inputs.items(), key=lambda kv: _natural(kv[0]))
                   if name not in replaced)
    dims = sorted(set().union(*(dim_symbols([s.offset]) for s in slots)))
    params = tuple(sorted(_param_nodes(hir, chosen).values(), key=lambda p: p.key))
    caches = tuple((s.cache, s.type) for s in sorted(slots, key=lambda s: _natural(s.cache)))
    return Signature(function, inputs, params, tuple(hir.outputs), caches, tuple(dims))


def _var_name(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _lower_function(bb: relax.BlockBuilder, hir: HIR, sig: Signature,
                    writers: Mapping[tuple[str, int], tvm.ir.GlobalVar], device: str, kernel: KernelParams) -> None:
    fn = FunctionBuilder(bb, hir, device, kernel)
    node_of = {p.key: nid for nid, p in _param_nodes(hir).items()}
    specs = {p.key: p for p in sig.params}
    inputs = {name: relax.Var(_var_name(name), fn.ty(t)) for name, t in sig.inputs}
    for _, t in sig.caches:  # ring caches' capacities are symbols of their own
        fn.dims.update({s: tirx.Var(s, "int64") for s in dim_symbols(t.shape) if s not in fn.dims})
    caches = {name: relax.Var(_var_name(name), fn.ty(t)) for name, t in sig.caches}
    dims = [relax.Var("dims", relax.ShapeType([fn.dims[d] for d in sig.dims]))] if sig.dims else []
    params = [relax.Var("w_" + _var_name(node_of[p.key]), fn.ty(p.physical)) for p in sig.params]
    for name, var in inputs.items():
        fn.values[hir.inputs[name].id] = var
    for p, var in zip(sig.params, params, strict=True):
        fn.values[node_of[p.key]] = weight_view(specs[p.key], var)
    slots = {s.node: s for s in cache_plan(hir, device)}
    written: dict[str, relax.Var] = {}  # present_* output -> its cache buffer after this call's write

    def write(slot: kv_cache.CacheSlot) -> relax.Var:
        args = [caches[slot.cache], fn.value(slot.new), relax.prim_value(fn.dim(slot.offset))]
        kind = (TVM_DTYPES[slot.type.dtype], eval_dim(slot.type.shape[-1], {}))
        written[slot.output] = fn.emit(relax.call_tir_inplace(writers[kind], args, 0,
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
                    fn.values[node.id] = fn.emit(lower_const(fn, node))
                    continue
                if node.op is Op.RESULT:
                    item = relax.TupleGetItem(fn.results[node.inputs[0]], node.attr("index"))
                    fn.values[node.id] = fn.pin(item, node.type, node.id)
                    continue
                lowering = LOWERINGS.get(node.op)
                if lowering is None:
                    raise HIRError(f"%{node.id}: op {node.op.value} has no TVM lowering",
                                   hint="add a lowering for the op in rlx/targets/lowerings.py")
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


def weight_view(spec: ParamSpec, var: relax.Var) -> relax.Var | WeightView:
    """What a lowering gets for a weight: the tensor itself, or (quantized, or not plain) a view
    saying how to read it."""
    if not spec.type.is_quantized and spec.layout == layouts.PLAIN:
        return var
    fmt = quant_format(spec.type.quant) if spec.type.is_quantized else None  # type: ignore[arg-type]  # quant is set
    return WeightView(var, spec.layout, fmt)


def lower(graphs: Mapping[str, HIR], device: str = "cpu", kernel: KernelParams = CONSERVATIVE_PARAMS) -> Lowered:
    """Lower several graphs (function name -> HIR) into ONE IRModule, so they share kernels and
    compile once; weights are laid out for `device`'s kernels (`layouts.py`), CPU kernels shaped
    by the target's `kernel` parameters (`machine.kernel_params(target)`; the default is the
    conservative machine's, correct on any CPU)."""
    bb = relax.BlockBuilder()
    signatures: dict[str, Signature] = {}
    chosen = choose_layouts(graphs, device)
    for function, hir in graphs.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", function):
            raise HIRError(f"function name {function!r} must be an identifier",
                           hint="name functions with letters, digits and _")
        signatures[function] = signature_of(hir, function, chosen, device)
    kinds = sorted({(TVM_DTYPES[t.dtype], eval_dim(t.shape[-1], {})) for sig in signatures.values()
                    for _, t in sig.caches})
    writers = {kind: bb.add_func(kernels.kv_write(*kind), f"kv_write_{kind[0]}_{kind[1]}") for kind in kinds}
    for function, hir in graphs.items():
        _lower_function(bb, hir, signatures[function], writers, device, kernel)
    return Lowered(bb.get(), signatures)


def lower_for(graphs: Mapping[str, HIR], target: ResolvedTarget) -> Lowered:
    """`lower` for a resolved target: its device's weight layouts, its CPU's kernel parameters."""
    return lower(graphs, target.device, kernel_params(target.target))


def lower_hir(hir: HIR, function: str | None = None, device: str = "cpu") -> Lowered:
    """One graph; the function is named `function` or after the HIR (`gemma3_prefill`)."""
    return lower({function or _var_name(hir.name): hir}, device)


def param_keys(signatures: Sequence[Signature]) -> dict[str, ParamSpec]:
    """Every distinct param over several functions, by key (what to upload once and share)."""
    out: dict[str, ParamSpec] = {}
    for sig in signatures:
        for p in sig.params:
            out.setdefault(p.key, p)
    return out
