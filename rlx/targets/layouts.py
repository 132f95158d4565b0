"""How a compiled module takes each weight: the layout the kernels read, chosen at compile time.

Weights are inputs of the compiled functions, computed on the host when they load
(`lower.ParamSpec.materialize`), so they can be stored in whatever order the kernels stream
best. Two layouts:

- **plain**: the tensor as the graph declares it (a quantized one: its blocks, uint8
  [rows, row_bytes], exactly as stored).
- **il16** (CPU, 2-D weights with a multiple of 16 rows, read only by linears and embeddings):
  16 consecutive rows interleaved, `[rows / 16, C, 16]` with element (r, c) at
  `[r // 16, c, r % 16]`, C being the row's values (float weights) or, quantized, the bytes of
  its block planes (`block_planes.py`: scales, offsets, integers, each a plane, so a field sits
  at the same offset for 16 rows and is loaded for 16 outputs at once). One 16-lane vector then
  holds 16 output rows, so a GEMV accumulates 16 outputs per FMA without horizontal sums and a
  GEMM's 16-wide column panel is one contiguous stream. An embedding lookup gathers one row with
  stride 16, which costs nothing next to the LM head that reads the whole table. Diagrams and
  the kernels that read it: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Set

import numpy as np

from rlx.hir.dtypes import DType
from rlx.hir.ops import Op
from rlx.hir.quant import quant_format
from rlx.hir.tensor_type import TensorType
from rlx.targets import block_planes
from rlx.targets.machine import LANES

PLAIN, IL16 = "plain", "il16"
# (op, input position) that read an il16 weight: what `lowerings` implements for it
IL16_READERS: frozenset[tuple[Op, int]] = frozenset({(Op.LINEAR, 1), (Op.LINEAR_EPILOGUE, 1), (Op.EMBED, 0)})
DEVICES_WITH_IL16 = frozenset({"cpu"})


def choose(t: TensorType, readers: Set[tuple[Op, int]], device: str) -> str:
    rows = t.shape[0] if t.rank == 2 else None
    if device in DEVICES_WITH_IL16 and isinstance(rows, int) and rows % LANES == 0 and readers and \
            readers <= IL16_READERS:
        return IL16
    return PLAIN


def stored_type(t: TensorType) -> TensorType:
    """The plain form: a quantized weight's blocks as uint8 [..., row_bytes]."""
    if not t.is_quantized:
        return t
    k = t.shape[-1]
    return TensorType(DType.U8, (*t.shape[:-1], quant_format(t.quant).row_bytes(k)))  # type: ignore[arg-type]  # quant set, weights static


def physical_type(t: TensorType, layout: str) -> TensorType:
    if layout == PLAIN:
        return stored_type(t)
    rows, k = t.shape
    if t.is_quantized:
        lines = block_planes.planes_of(quant_format(t.quant)).lines(rows, k)  # type: ignore[arg-type]  # (as above)
        return TensorType(DType.U8, (lines, LANES))
    return TensorType(t.dtype, (rows // LANES, k, LANES))  # type: ignore[operator]  # weights are static


def pack(value: np.ndarray, layout: str, quant: str | None = None) -> np.ndarray:
    """A plain array (a quantized weight's blocks, format `quant`) in `layout`: il16 takes
    [rows, C] to [rows / 16, C, 16], blocks to their planes first."""
    if layout == PLAIN:
        return np.ascontiguousarray(value)
    if quant:
        return block_planes.pack(quant_format(quant), value)
    rows, cols = value.shape
    return np.ascontiguousarray(value.reshape(rows // LANES, LANES, cols).transpose(0, 2, 1))
