"""Lowering state of one Relax function: the block builder, symbolic dims, values by node id.

`lower.py` drives it node by node, `lowerings.py` adds each op's Relax through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm import relax, tirx
from tvm.sym import Analyzer

from rlx.errors import HIRError
from rlx.hir.conventions import KV_CAP
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.quant import QuantFormat
from rlx.hir.shapes import Dim, Shape, dim_symbols
from rlx.hir.tensor_type import TensorType
from rlx.targets.machine import CONSERVATIVE_PARAMS, KernelParams

TVM_DTYPES: dict[DType, str] = {
    DType.F32: "float32", DType.F16: "float16", DType.BF16: "bfloat16",
    DType.I32: "int32", DType.I64: "int64", DType.U8: "uint8", DType.BOOL: "bool",
}



class FunctionBuilder:
    """Lowering state of one function: the block builder, symbolic dims, values by node id."""

    def __init__(self, bb: relax.BlockBuilder, hir: HIR, device: str = "cpu",
                 kernel: KernelParams = CONSERVATIVE_PARAMS) -> None:
        self.bb = bb
        self.hir = hir
        self.device = device  # "cpu" | "cuda" | "metal": lowerings with a device-specific kernel ask
        self.kernel = kernel  # the target's CPU kernel parameters (`machine.py`): the GEMM's row padding
        symbols = sorted(set().union(*(dim_symbols(n.type.shape) for n in hir.nodes())) | {KV_CAP})
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
            raise HIRError(f"lowering {what}: Relax type {got} does not match HIR type {t}",
                           hint="this is a bug in the lowering: please report it")
        analyzer = Analyzer()
        same = got.shape is not None and all(
            analyzer.can_prove_equal(a, b) for a, b in zip(got.shape.values, want.shape.values, strict=True))
        return var if same else self.bb.match_cast(var, want)


@dataclass(frozen=True)
class WeightView:
    """A weight as a function takes it when that is not the graph's plain tensor: in a kernel
    layout (`layouts.py`) and / or quantized (uint8 blocks of `format`, decoded in the kernels of
    the ops that read blocks, `OpSpec.quantized_inputs`). Only the lowerings of the readers
    `layouts.IL16_READERS` lists ever see one."""

    tensor: relax.Var
    layout: str
    format: QuantFormat | None = None


@dataclass(frozen=True)
class CacheView:
    """K or V of all positions so far: the first `length` rows (axis 2) of a cache buffer."""

    tensor: relax.Var
    length: tirx.PrimExpr

