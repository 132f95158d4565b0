"""Quantized weights as CPU kernels read them: each block split into planes, 16 rows interleaved.

A GGUF block is a struct (an f16 scale, packed nibbles, a bit field of fifth bits, 6-bit scales
packed three to a 12-byte field...): decoding it inside a GEMV costs more than reading it, and
the integer work differs per format. At load time every quantized weight in the il16 layout
(`layouts.py`) is rewritten, exactly, as

    w[r, k] = S[r, b] * (q[r, k] - zero) + O[r, b]        b = k // block

with one integer plane `q` and per-block planes `S` (and `O`), the form every format shares
(`_SPLITS` gives each format's). The numbers are the format's own: S and O are what
`gguf.quants.dequantize` computes per block (`d`, or `d * sc` in float32 for K-quants; `m`, or
`-dmin * m`), and `S * (q - zero) + O` rounds like its formula, so a kernel decoding a tile gets
the reference's values bit for bit (tests/targets/test_quant_decode.py). K-quants keep S and O
as their two factors (f16 `d` per 256 values, the small integer per block), multiplied in the
kernel: a third of the bytes of float32 S / O planes. Only two integer
encodings remain, so the kernels (`weight_kernels.py`) are format-free:

- **i8**: one signed byte per value (Q8_0; Q5_0 / Q5_1 / Q5_K / Q6_K, whose 5 and 6-bit values
  are widened: unpacking them costs more than the extra bytes, measured in bench/),
- **u4**: two values per byte, value j of each 32 in the low nibble of byte j, value j + 16 in
  its high one (Q4_0 with zero 8, Q4_1, Q4_K).

The weight is one uint8 [rows / 16 * columns, 16] array holding the planes one after the
other, each il16 (lane l of every 16-byte line is row l of the group): S for every group (per
group, its blocks' scales, 2 little-endian bytes, one byte a line; factored: `d` per super-block,
then a plane of `sc`, a byte per block), then O likewise (`dmin`, then `m`), then q (a group's K
bytes, or K / 2). Whole planes rather than one [S | O | q] slab per group: a GEMV
then streams two arrays, as with separate tensors, which measured twice as fast as alternating
between the parts of a slab. The layout with a diagram: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from rlx.hir.quant import QuantFormat
from rlx.targets.machine import LANES
from rlx.targets.quant_decode import Expr

F32 = "float32"
_BYTES = {"float16": 2, "float32": 4}
QUANT_PLANE = 4  # the integers' plane, last in `Planes.widths`


@dataclass(frozen=True)
class Planes:
    """A format's plane form: `w = S * (q - zero) + O` per block of `block` values.

    K-quants keep S and O factored as their file does (`factor` set): S = d * sc and
    O = -(dmin * m), with the float16 d / dmin once per super-block of `super_block` values and the
    small integers sc / m once per block, each factor a plane. The kernel multiplies them in
    float32 as `gguf.quants.dequantize` does (so the values stay bit for bit), and a Q4_K weight
    takes 148 bytes per 256 values instead of 192 with float32 S / O planes (Q6_K 274 instead of
    320): less memory, and a decode GEMV, bound by memory, ~1.2x faster (docs/kernels.md)."""

    quant: str            # "i8" | "u4"
    zero: int             # subtracted from q (u4 symmetric formats)
    block: int            # values per S / O
    scale: str            # dtype of S: "float16" (the format's own d); factored: of d
    offset: str | None    # dtype of O, or None; factored: of dmin
    factor: str | None = None   # factored S / O: dtype of the per-block integers sc (and m: uint8)
    super_block: int = 0        # factored: values per d / dmin

    def widths(self, k: int) -> tuple[int, int, int, int, int]:
        """Bytes per row of `k` values in each plane, in order: S (factored: d), sc, O (dmin), m, q."""
        blocks = k // self.block
        quant = k if self.quant == "i8" else k // 2
        if self.factor is None:
            return (blocks * _BYTES[self.scale], 0, blocks * _BYTES[self.offset] if self.offset else 0, 0, quant)
        if k % self.super_block:  # GGUF never writes such a row: a K-quant's rows are whole super-blocks
            raise ValueError(f"a row of {k} values is not whole super-blocks of {self.super_block}")
        supers = k // self.super_block
        off = (supers * _BYTES[self.offset], blocks) if self.offset else (0, 0)
        return (supers * _BYTES[self.scale], blocks, *off, quant)

    def columns(self, k: int) -> int:
        """Bytes per row of `k` values (a group of 16 rows takes this many 16-byte lines)."""
        return sum(self.widths(k))

    def lines(self, rows: int, k: int) -> int:
        """The array's first dim: [lines, 16]."""
        return rows // LANES * self.columns(k)


# ---- numpy: a format's blocks -> (q, S, O), exactly the reference's numbers ----

@dataclass(frozen=True)
class Factored:
    """A K-quant's per-block number as the file holds it: `sign * d[super] * small[block]`."""

    d: np.ndarray        # float16 [super-blocks]
    small: np.ndarray    # integers [super-blocks, blocks a super-block]
    sign: float = 1.0

    def value(self) -> np.ndarray:
        """float32, as gguf.quants.dequantize computes it (the product, then the sign)."""
        product = self.d.astype(np.float32)[:, None] * self.small.astype(np.float32)
        return product if self.sign > 0 else -product


Number = np.ndarray | Factored
Split = tuple[np.ndarray, Number, Number | None]  # q [n, K], S [n, K/block], O or None


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Legacy blocks: value j < half in the low nibble of byte j, value j + half in its high one."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray, count: int) -> np.ndarray:
    bits = np.ascontiguousarray(qh).view(np.uint32)[:, 0:1] >> np.arange(count, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def _q8_0(b: np.ndarray, fmt: QuantFormat) -> Split:
    return b[:, 2:].view(np.int8), _f16(b, 0)[:, None], None


def _q4_0(b: np.ndarray, fmt: QuantFormat) -> Split:
    return _nibbles(b[:, 2:]), _f16(b, 0)[:, None], None


def _q4_1(b: np.ndarray, fmt: QuantFormat) -> Split:
    return _nibbles(b[:, 4:]), _f16(b, 0)[:, None], _f16(b, 2)[:, None]


def _q5_0(b: np.ndarray, fmt: QuantFormat) -> Split:
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6], 32) << 4)
    return (q.astype(np.int16) - 16).astype(np.int8), _f16(b, 0)[:, None], None


def _q5_1(b: np.ndarray, fmt: QuantFormat) -> Split:
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8], 32) << 4)
    return q.astype(np.int8), _f16(b, 0)[:, None], _f16(b, 2)[:, None]


def _k_scales(b: np.ndarray) -> tuple[Factored, Factored]:
    """S = d * sc and O = -(dmin * m) of the 8 sub-blocks (llama.cpp's get_scale_min_k4)."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    lo, hi, mix = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 2) & 0x30)], axis=1)
    m = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 2) & 0x30)], axis=1)
    return Factored(_f16(b, 0), sc), Factored(_f16(b, 2), m, -1.0)


def _k_low(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K quants: 64 values share 32 bytes, low nibbles first."""
    return np.stack([qs.reshape(-1, 4, 32) & 15, qs.reshape(-1, 4, 32) >> 4], axis=2).reshape(-1, 256)


def _q4_k(b: np.ndarray, fmt: QuantFormat) -> Split:
    s, o = _k_scales(b)
    return _k_low(b[:, 16:]), s, o


def _q5_k(b: np.ndarray, fmt: QuantFormat) -> Split:
    s, o = _k_scales(b)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return (_k_low(b[:, 48:]) | (high.reshape(-1, 256) << 4)).astype(np.int8), s, o


def _q6_k(b: np.ndarray, fmt: QuantFormat) -> Split:
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 15).reshape(-1, 256) | ((qh & 3).reshape(-1, 256) << 4)).astype(np.int16) - 32
    return q.astype(np.int8), Factored(_f16(b, 208), b[:, 192:208].view(np.int8)), None


# per format family (rlx's group formats are their GGUF twin with another block)
_SPLITS: dict[str, tuple[Planes, Callable[[np.ndarray, QuantFormat], Split]]] = {
    "q8_0": (Planes("i8", 0, 32, "float16", None), _q8_0),
    "q4_0": (Planes("u4", 8, 32, "float16", None), _q4_0),
    "q4_1": (Planes("u4", 0, 32, "float16", "float16"), _q4_1),
    "q5_0": (Planes("i8", 0, 32, "float16", None), _q5_0),
    "q5_1": (Planes("i8", 0, 32, "float16", "float16"), _q5_1),
    "q4_k": (Planes("u4", 0, 32, "float16", "float16", "uint8", 256), _q4_k),
    "q5_k": (Planes("i8", 0, 32, "float16", "float16", "uint8", 256), _q5_k),
    "q6_k": (Planes("i8", 0, 16, "float16", None, "int8", 256), _q6_k),
}


def _family(fmt: QuantFormat) -> str:
    return fmt.name if fmt.gguf_type is not None else fmt.name.split("g")[0]


def planes_of(fmt: QuantFormat) -> Planes:
    p = _SPLITS[_family(fmt)][0]
    return Planes(p.quant, p.zero, fmt.block, p.scale, p.offset) if fmt.gguf_type is None else p


def _split_blocks(fmt: QuantFormat, blocks: np.ndarray) -> Split:
    flat = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, fmt.block_bytes)
    q, s, o = _SPLITS[_family(fmt)][1](flat, fmt)
    return q.reshape(blocks.shape[0], -1), s, o


def split(fmt: QuantFormat, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocks [n, row_bytes] -> q [n, K], S [n, K / block], O (or None) in float (factored ones
    multiplied out, as the kernels do): the numbers the planes hold."""
    n = blocks.shape[0]
    q, s, o = _split_blocks(fmt, blocks)
    p = planes_of(fmt)

    def number(v: Number, dtype: str) -> np.ndarray:
        return (v.value() if isinstance(v, Factored) else v.astype(dtype)).reshape(n, -1)

    return q, number(s, p.scale), None if o is None or p.offset is None else number(o, p.offset)


def _number_planes(v: Number | None, dtype: str | None, rows: int) -> list[np.ndarray]:
    """A per-block number's planes as bytes [rows, columns]: one, or two when factored."""
    if v is None or dtype is None:
        return []
    if isinstance(v, Factored):
        return [v.d.astype(np.float16).view(np.uint8).reshape(rows, -1), v.small.view(np.uint8).reshape(rows, -1)]
    return [v.astype(dtype).view(np.uint8).reshape(rows, -1)]


def _u4(q: np.ndarray) -> np.ndarray:
    """Per 32 values: byte j = value j | value j + 16 << 4."""
    q = q.astype(np.uint8).reshape(q.shape[0], -1, 2, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def pack(fmt: QuantFormat, blocks: np.ndarray) -> np.ndarray:
    """Blocks [rows, row_bytes] -> the planes, uint8 [rows / 16 * columns, 16]."""
    q, s, o = _split_blocks(fmt, blocks)
    rows, p = q.shape[0], planes_of(fmt)
    parts = [*_number_planes(s, p.scale, rows), *_number_planes(o, p.offset, rows),
             q.view(np.uint8) if p.quant == "i8" else _u4(q)]
    return np.concatenate([part.reshape(rows // LANES, LANES, -1).transpose(0, 2, 1).reshape(-1, LANES)
                           for part in parts])


# ---- TIR: reading the slabs ----

@dataclass(frozen=True)
class PlaneReader:
    """Element access to a weight's planes `buf` [lines, 16] with `k` values a row."""

    buf: te.Tensor
    planes: Planes
    k: int

    @property
    def groups(self) -> int:
        return int(self.buf.shape[0]) // self.planes.columns(self.k)

    def _line(self, plane: int, group: Expr, col: Expr) -> Expr:
        """The line of column `col` of `group` in plane `plane` (`Planes.widths`' order)."""
        widths = self.planes.widths(self.k)
        return self.groups * sum(widths[:plane]) + group * widths[plane] + col

    def _byte(self, plane: int, r: Expr, col: Expr) -> Expr:
        return self.lane_byte(plane, r // LANES, r % LANES, col)

    def lane_byte(self, plane: int, group: Expr, lane: Expr, col: Expr) -> Expr:
        return self.buf[self._line(plane, group, col), lane]

    def _float(self, plane: int, r: Expr, col: Expr, dtype: str) -> Expr:
        """The little-endian `dtype` whose bytes start at column `col` of `plane`, as float32."""
        n = _BYTES[dtype]
        word = f"uint{8 * n}"
        bits = self._byte(plane, r, col).astype(word)
        for i in range(1, n):
            bits = bits | (self._byte(plane, r, col + i).astype(word) << tirx.const(8 * i, word))
        value = tirx.reinterpret(dtype, bits)
        return value if dtype == F32 else value.astype(F32)

    def _number(self, plane: int, r: Expr, b: Expr, dtype: str, small: str) -> Expr:
        """Block b's number in plane `plane` (a float), or (factored) d of its super-block in
        `plane` times its `small` integer in `plane + 1`, in float32 as the reference multiplies."""
        p = self.planes
        if p.factor is None:
            return self._float(plane, r, b * _BYTES[dtype], dtype)
        d = self._float(plane, r, b // (p.super_block // p.block) * _BYTES[dtype], dtype)
        byte = self._byte(plane + 1, r, b)
        return d * (tirx.reinterpret("int8", byte) if small == "int8" else byte).astype(F32)

    def scale(self, r: Expr, b: Expr) -> Expr:
        return self._number(0, r, b, self.planes.scale, self.planes.factor or "")

    def offset(self, r: Expr, b: Expr) -> Expr | None:
        p = self.planes
        if p.offset is None:
            return None
        o = self._number(2, r, b, p.offset, "uint8")  # a K-quant's m is unsigned
        return o * tirx.const(-1.0, F32) if p.factor is not None else o  # O = -(dmin * m): exact

    def quant(self, r: Expr, k: Expr) -> Expr:
        """The stored integer of element k (before `zero`), int32."""
        return self.lane_quant(r // LANES, r % LANES, k)

    def lane_quant(self, group: Expr, lane: Expr, k: Expr) -> Expr:
        """`quant` of row group * 16 + lane, addressed without a division (kernels whose loops
        run over groups and lanes keep a plain vector load this way)."""
        if self.planes.quant == "i8":
            return tirx.reinterpret("int8", self.lane_byte(QUANT_PLANE, group, lane, k)).astype("int32")
        byte = self.lane_byte(QUANT_PLANE, group, lane, k // 32 * 16 + k % 16).astype("int32")
        return (byte >> ((k % 32) // 16 * 4)) & 15

    def value(self, r: Expr, k: Expr) -> Expr:
        """w[r, k] in float32, rounded as the reference's formula: S * (q - zero) + O."""
        p = self.planes
        q = self.quant(r, k)
        w = self.scale(r, k // p.block) * (q - p.zero if p.zero else q).astype(F32)
        o = self.offset(r, k // p.block)
        return w if o is None else w + o

    def block_offset(self, r: Expr, b: Expr) -> Expr | None:
        """What block b adds per unit of x: O - zero * S (None when both are absent)."""
        p = self.planes
        o = self.offset(r, b)
        if p.zero:
            shift = self.scale(r, b) * tirx.const(-float(p.zero), F32)
            return shift if o is None else shift + o
        return o
