"""GGUF blocks decoded inside kernels: a TIR expression for one weight element in float32.

A quantized weight in the plain layout (`layouts.py`: GPU targets, and CPU weights whose rows
are not a multiple of 16) arrives as its blocks, uint8 [rows, row_bytes], llama.cpp's block
structs byte for byte (`rlx.hir.quant`). `value(fmt, blocks, r, k)` is element k of row r,
computed with the same float32 operations as `gguf.quants.dequantize` (`d * (q - 8)`,
`(d * sc) * q - dmin * m`...), bit for bit. (CPU kernels read il16 weights as block planes
instead, `block_planes.py`, where the integer work is done once at load time.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import tvm
from tvm import te, tirx

from rlx.hir.quant import QuantFormat

F32 = "float32"
# a TIR PrimExpr (TVM 0.27 has no separate Python class for it); the kernel modules' one name for it
Expr: TypeAlias = tvm.ir.Expr


@dataclass(frozen=True)
class Rows:
    """Byte addressing of a weight's blocks [rows, row_bytes]."""

    buf: te.Tensor

    def byte(self, r: Expr, at: Expr) -> Expr:
        return self.buf[r, at].astype("int32")

    def f16(self, r: Expr, at: Expr) -> Expr:
        """The little-endian f16 at byte `at`, widened to float32."""
        bits = (self.byte(r, at) | (self.byte(r, at + 1) << 8)).astype("uint16")
        return tirx.reinterpret("float16", bits).astype(F32)

    def i8(self, r: Expr, at: Expr) -> Expr:
        return tirx.reinterpret("int8", self.buf[r, at]).astype("int32")


def _nibble(byte: Expr, high: Expr) -> Expr:
    return (byte >> (high * 4)) & 15


def _bit(rows: Rows, r: Expr, at: Expr, j: Expr) -> Expr:
    """Bit j of the little-endian bit field starting at byte `at`."""
    return (rows.byte(r, at + j // 8) >> (j % 8)) & 1


Value = Callable[[QuantFormat, Rows, Expr, Expr], Expr]


def _base(fmt: QuantFormat, k: Expr) -> tuple[Expr, Expr]:
    return k // fmt.block * fmt.block_bytes, k % fmt.block


def _legacy_quant(fmt: QuantFormat, rows: Rows, r: Expr, k: Expr, header: int, high_bits: int | None) -> Expr:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1: value j of a block is the low nibble of byte j (j < block/2),
    else the high nibble of byte j - block/2; Q5's fifth bit comes from a 32-bit field."""
    half = fmt.block // 2
    base, j = _base(fmt, k)
    q = _nibble(rows.byte(r, base + header + j % half), j // half)
    return q if high_bits is None else q | (_bit(rows, r, base + high_bits, j) << 4)


def _symmetric(zero: int, header: int, high_bits: int | None = None) -> Value:
    """d * (q - zero): Q4_0 (zero 8), Q5_0 (zero 16); Q8_0 stores q - zero itself (zero 0)."""
    def value(fmt: QuantFormat, rows: Rows, r: Expr, k: Expr) -> Expr:
        base, j = _base(fmt, k)
        q = _legacy_quant(fmt, rows, r, k, header, high_bits) - zero if zero else rows.i8(r, base + 2 + j)
        return rows.f16(r, base) * q.astype(F32)
    return value


def _with_min(header: int, high_bits: int | None = None) -> Value:
    """d * q + m: Q4_1, Q5_1."""
    def value(fmt: QuantFormat, rows: Rows, r: Expr, k: Expr) -> Expr:
        base = _base(fmt, k)[0]
        q = _legacy_quant(fmt, rows, r, k, header, high_bits)
        return rows.f16(r, base) * q.astype(F32) + rows.f16(r, base + 2)
    return value


def _k_scale_min(rows: Rows, r: Expr, at: Expr, s: Expr) -> tuple[Expr, Expr]:
    """llama.cpp's get_scale_min_k4: sub-block s's 6-bit scale and min from the 12 bytes at `at`."""
    low = s < 4
    a, b = rows.byte(r, at + s), rows.byte(r, at + s + 4)
    c = rows.byte(r, at + tirx.max(s - 4, 0))
    sc = tirx.Select(low, a & 63, (b & 15) | ((c >> 6) << 4))
    m = tirx.Select(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, m


def _k4(qs_at: int, high_at: int | None, block_bytes: int) -> Value:
    """Q4_K / Q5_K: 256 values, 8 sub-blocks of 32 with 6-bit scales and mins; the quants of 64
    values share 32 bytes (low nibbles, then high nibbles); Q5_K adds a fifth bit per value."""
    def value(fmt: QuantFormat, rows: Rows, r: Expr, k: Expr) -> Expr:
        base, j = k // 256 * block_bytes, k % 256
        chunk, half, lane = j // 64, (j // 32) % 2, j % 32
        q = _nibble(rows.byte(r, base + qs_at + chunk * 32 + lane), half)
        if high_at is not None:
            q = q | (((rows.byte(r, base + high_at + lane) >> (2 * chunk + half)) & 1) << 4)
        sc, m = _k_scale_min(rows, r, base + 4, j // 32)
        d, dmin = rows.f16(r, base), rows.f16(r, base + 2)
        return (d * sc.astype(F32)) * q.astype(F32) - dmin * m.astype(F32)
    return value


def _q6_k(fmt: QuantFormat, rows: Rows, r: Expr, k: Expr) -> Expr:
    """Q6_K: 256 values in two halves of 128; ql holds low nibbles (64 bytes a half), qh 2-bit
    highs (32 bytes a half), 16 int8 scales of 16 values, d last; q - 32 is the signed value.
    Value j's scale is 8 * half + (j % 32) // 16 + 2 * group (half = j // 128, group = (j % 128) // 32)."""
    base, j = k // 256 * 210, k % 256
    half, rest = j // 128, j % 128
    group, lane = rest // 32, rest % 32
    low = _nibble(rows.byte(r, base + 64 * half + lane + 32 * (group % 2)), group // 2)
    high = (rows.byte(r, base + 128 + 32 * half + lane) >> (2 * group)) & 3
    scale = rows.f16(r, base + 208) * rows.i8(r, base + 192 + 8 * half + lane // 16 + 2 * group).astype(F32)
    return scale * ((low | (high << 4)) - 32).astype(F32)


VALUES: dict[str, Value] = {
    "q8_0": _symmetric(0, 2),
    "q4_0": _symmetric(8, 2),
    "q5_0": _symmetric(16, 6, high_bits=2),
    "q4_1": _with_min(4),
    "q5_1": _with_min(8, high_bits=4),
    "q4_k": _k4(16, None, 144),
    "q5_k": _k4(48, 16, 176),
    "q6_k": _q6_k,
}


def value(fmt: QuantFormat, rows: Rows, r: Expr, k: Expr) -> Expr:
    """Element (r, k); rlx's group formats (`q4_0g64`) decode like their GGUF twin."""
    return VALUES[fmt.name if fmt.gguf_type is not None else fmt.name.split("g")[0]](fmt, rows, r, k)
