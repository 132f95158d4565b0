"""Mixed precision: matmul-class work in f16 / bf16, the numerically touchy ops in float32.

`precision{compute=f16}` (or `bf16`; `mixed=auto|off`; `layers=f16|f32|...` per layer) rewrites
a graph's dtypes. It runs after fusion (a cast between two ops would hide the patterns the fusion
passes look for), so it knows the fused ops too. Each op is in one of three classes, declared
with the op (`OpSpec.precision`, `rlx/hir/ops.py`):

- **compute** (linear, matmul, linear_epilogue, attention, moe, embed, the elementwise ops,
  concat): runs in its layer's compute dtype; its float inputs are cast to it.
- **float32** (with `mixed="auto"`: rms_norm, add_rms_norm, softmax, softcap, rope, causal_mask):
  float inputs are cast to f32 and the result is f32. `mixed="off"` makes them compute ops as
  well (norm weights and all). RoPE's inv_freq / cos|sin table is never cast: rounding it would
  shift every angle. (Whatever their class, the interpreter and the lowering reduce norms and
  softmax in f32 inside the op; the class decides the dtype *between* ops.)
- **layout** (reshape, transpose, slice, repeat_kv, result, cast): keep their input's dtype;
  moving data needs no rounding.

Casts are made on demand, one per (value, dtype), next to the first reader. A value already in
the wanted dtype is read as it is, so consecutive f32 ops (softcap -> mask -> softmax; an
add_rms_norm's residual sum into the next add_rms_norm) chain in f32 without a round trip
through the compute dtype: in a fused graph the residual stream stays f32, in an unfused one the
residual adds are compute ops and it is f16 / bf16 between the norms.

- **Weights.** Params, and values computed from params alone (a fused q|k|v concat, a folded
  constant), keep their f32 type; the cast their reader needs sits right after them, so it is
  weight-only too: the TVM lowering computes it at load time (`lower.weight_only`), its
  Signature lists the param as f16 / bf16, and a compiled artifact stores the weights in that
  dtype: half the bytes. One cast per weight and dtype, shared by every reader (a tied embedding
  and LM head read one f16 table).
- **Graph interface.** Outputs keep their declared dtypes (the logits stay f32: a cast is their
  last node), except the KV cache: `present_k.i` / `present_v.i` are in layer i's compute dtype,
  and the `past_k.i` / `past_v.i` inputs are retyped to match, so a decode step takes the last
  step's outputs unchanged and the cache is half the bytes (a paged step's page pools alike:
  written in place, they must be the type the writes store). Other float inputs (`inputs_embeds`,
  `attn_mask`, `media_attn_bias`, `last_token_select`) keep their dtype and are cast where read.
- **Layers.** A node whose meta says layer i (`rlx.hir.conventions`) computes in `layers[i]`;
  anything else (embedding, final norm, LM head) and every layer when `layers` is empty, in
  `compute`. `Profile.layer_dtypes` gives the tuple (`[[layers]] dtype` patches). The KV cache
  inputs and outputs are the graph's `kv` slots, each with its layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

from rlx.hir import conventions as cv
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import OPS, Op, TypeRuleError
from rlx.hir.ops import Precision as Class
from rlx.hir.pass_infra import Pass, PassError, PassResult, register

COMPUTE_OPS = frozenset(op for op, spec in OPS.items() if spec.precision is Class.COMPUTE)
F32_OPS = frozenset(op for op, spec in OPS.items() if spec.precision is Class.F32)
UNCAST_INPUTS: dict[Op, frozenset[int]] = {Op.ROPE: frozenset({2}), Op.ROPE_TABLE: frozenset({2})}
MIXED = ("auto", "off")


def _float_dtype(text: str, where: str) -> DType:
    try:
        dtype = DType.parse(text.strip())
    except ValueError:
        dtype = None
    if dtype is None or not dtype.is_float:
        floats = ", ".join(d.value for d in DType if d.is_float)
        raise PassError(f"precision: {where}={text!r} is not a float dtype", hint=f"use one of {floats}")
    return dtype


def static_nodes(hir: HIR) -> set[str]:
    """Nodes no graph input reaches (params, consts and what is computed from them alone)."""
    dynamic: set[str] = set()
    for n in hir.nodes():
        if n.op is Op.INPUT or any(i in dynamic for i in n.inputs):
            dynamic.add(n.id)
    return {n.id for n in hir.nodes()} - dynamic


@register
@dataclass(frozen=True)
class Precision(Pass):
    """See the module docstring. `layers` arrives as text from a pipeline (`f16|f16|f32`)."""

    name = "precision"
    compute: str = "f32"
    mixed: str = "auto"
    layers: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        _float_dtype(self.compute, "compute")
        if self.mixed not in MIXED:
            raise PassError(f"precision: mixed={self.mixed!r} must be one of {', '.join(MIXED)}",
                            hint="use mixed=auto or mixed=off")
        layers = self.layers.split("|") if isinstance(self.layers, str) else self.layers
        object.__setattr__(self, "layers", tuple(_float_dtype(d, "layers").value for d in layers if d.strip()))

    def layer_dtype(self, index: int | None) -> DType:
        """The compute dtype of layer `index` (None: a node outside the layer stack)."""
        if index is None or not self.layers:
            return DType.parse(self.compute)
        if index >= len(self.layers):
            raise PassError(f"precision: the graph has a layer {index}, but layers= gives {len(self.layers)} dtypes",
                            hint="give one dtype per layer (Profile.layer_dtypes does)")
        return DType.parse(cast(tuple[str, ...], self.layers)[index])

    def node_dtype(self, node: Node) -> DType | None:
        """What a non-leaf node computes in (None: a layout op, which keeps its input's dtype)."""
        kind = OPS[node.op].precision
        if kind is Class.LAYOUT:
            return None
        if kind is Class.F32 and self.mixed == "auto":
            return DType.F32
        if kind not in (Class.COMPUTE, Class.F32):
            raise PassError(f"precision: %{node.id}: no precision rule for op {node.op.value}",
                            hint="add the op to a precision class in rlx/hir/ops.py")
        return self.layer_dtype(cv.layer_of(node))

    def run(self, hir: HIR) -> PassResult:
        return _Rewrite(self, hir).run()


class _Rewrite:
    """One run: the graph rebuilt node by node, with casts made on demand (`read`)."""

    def __init__(self, spec: Precision, hir: HIR) -> None:
        self.spec, self.hir = spec, hir
        self.static = static_nodes(hir)
        self.out = HIR(hir.name)
        self.out.meta = copy.deepcopy(hir.meta)
        self.casts: dict[tuple[str, DType], str] = {}
        # cache inputs / outputs by name -> their layer: the KV slots, and a paged step's pools
        paged = cv.paged_layout(hir)
        pools = paged.pools if paged is not None else ()
        self.kv_inputs = {**{n: s.layer for n, s in cv.past_inputs(hir).items()}, **{p.input: p.layer for p in pools}}
        self.kv_outputs = {**{n: s.layer for n, s in cv.present_outputs(hir).items()},
                           **{p.output: p.layer for p in pools}}
        self.stats = {"casts": 0, "weight-casts": 0, "retyped": 0}

    def read(self, value: str, dtype: DType) -> str:
        """`value` as `dtype`: itself, or its (shared) cast. Ints and exact matches pass through."""
        node = self.out.node(value)
        if not node.type.dtype.is_float or node.type.dtype == dtype or node.type.is_quantized:
            return value  # a quantized weight is read as its blocks, whatever the compute dtype
        key = (value, dtype)
        if key not in self.casts:
            name = f"{value}.{dtype.value}"
            while name in self.hir or name in self.out:
                name += "_"
            self.out.insert_raw(Node(name, Op.CAST, (value,), node.type.with_dtype(dtype), (("dtype", dtype.value),)))
            self.casts[key] = name
            self.stats["weight-casts" if value in self.static else "casts"] += 1
        return self.casts[key]

    def rebuild(self, node: Node) -> Node:
        dtype = self.spec.node_dtype(node)
        keep = UNCAST_INPUTS.get(node.op, frozenset())
        inputs = tuple(i if dtype is None or pos in keep else self.read(i, dtype) for pos, i in enumerate(node.inputs))
        try:
            inferred = OPS[node.op].infer([self.out.node(i).type for i in inputs], node.attr_dict)
        except TypeRuleError as e:  # a dtype rule this pass does not know about
            raise PassError(f"precision: %{node.id} ({node.op.value}): {e}",
                            hint="this is a bug in the precision pass: please report it") from None
        return Node(node.id, node.op, inputs, inferred or node.type, node.attrs, dict(node.meta))

    def run(self) -> PassResult:
        for node in self.hir.nodes():
            layer = self.kv_inputs.get(node.attr("name")) if node.op is Op.INPUT else None
            if layer is not None and node.type.dtype.is_float:
                dtype = self.spec.layer_dtype(layer)
                new = Node(node.id, node.op, node.inputs, node.type.with_dtype(dtype), node.attrs, dict(node.meta))
            elif OPS[node.op].precision is Class.LEAF or node.id in self.static:
                new = node
            else:
                new = self.rebuild(node)
            self.stats["retyped"] += new.type != node.type
            self.out.insert_raw(new)
        for name, nid in self.hir.outputs.items():
            layer = self.kv_outputs.get(name)
            dtype = self.spec.layer_dtype(layer) if layer is not None else self.hir.node(nid).type.dtype
            self.out.raw_set_output(name, self.read(nid, dtype))
        return PassResult(self.out, self.out != self.hir, self.stats)
