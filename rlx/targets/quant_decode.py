"""Quantized blocks decoded inside kernels: one TIR expression per format for `w[n, k]` in float32.

The weight arrives as stored (`rlx.hir.quant`): uint8 [rows, row_bytes], `block_bytes` per block
of `block` values along k, llama.cpp's block structs byte for byte. `value(fmt, buf, row, k)`
reads the bytes element k of a row needs and computes its value with the same float32 operations
as `gguf.quants.dequantize` (so a kernel and the reference interpreter see identical weights):
f16 scales widened to float32, then `d * q` (Q8_0), `d * (q - 8)` (Q4_0), `d * q + m` (Q4_1),
`(d * sc) * q - dmin * m` (Q4_K / Q5_K), `(d * sc) * (q - 32)` (Q6_K).

Block-invariant parts (the scales) depend on k only through `k // block`, so loops that keep a
block's values together let LLVM hoist them; `rlx.targets.schedules` arranges that.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import te, tirx

from rlx.hir.quant import QuantFormat

F32 = "float32"
Expr = tvm.ir.Expr  # a TIR PrimExpr (TVM 0.27 has no separate Python class for it)
Decoder = Callable[[te.Tensor, Expr, Expr, QuantFormat], Expr]


def _u(v: int, dtype: str = "int32") -> Expr:
    return tirx.const(v, dtype)


def _byte(buf: te.Tensor, row: Expr, at: Expr) -> Expr:
    """Byte `at` of a row, as int32 (bit operations below work on int32)."""
    return buf[row, at].astype("int32")


def _f16(buf: te.Tensor, row: Expr, at: Expr) -> Expr:
    """The little-endian f16 at byte `at`, widened to float32."""
    bits = (_byte(buf, row, at) | (_byte(buf, row, at + 1) << 8)).astype("uint16")
    return tirx.reinterpret("float16", bits).astype(F32)


def _nibble(byte: Expr, high: Expr) -> Expr:
    return (byte >> (high * 4)) & 15


def _q8_0(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    base = k // fmt.block * fmt.block_bytes
    q = tirx.reinterpret("int8", buf[row, base + 2 + k % fmt.block]).astype(F32)
    return _f16(buf, row, base) * q


def _q4_0(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    """Value j of a block: low nibble of byte j (j < block/2), else high nibble of byte j - block/2."""
    half = fmt.block // 2
    base, j = k // fmt.block * fmt.block_bytes, k % fmt.block
    q = _nibble(_byte(buf, row, base + 2 + j % half), j // half) - 8
    return _f16(buf, row, base) * q.astype(F32)


def _q4_1(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    half = fmt.block // 2
    base, j = k // fmt.block * fmt.block_bytes, k % fmt.block
    q = _nibble(_byte(buf, row, base + 4 + j % half), j // half)
    return _f16(buf, row, base) * q.astype(F32) + _f16(buf, row, base + 2)


def _high_bit(buf: te.Tensor, row: Expr, at: Expr, j: Expr) -> Expr:
    """Bit j of the little-endian 32-bit word at byte `at`."""
    return (_byte(buf, row, at + j // 8) >> (j % 8)) & 1


def _q5_0(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    base, j = k // 32 * 22, k % 32
    q = (_nibble(_byte(buf, row, base + 6 + j % 16), j // 16) | (_high_bit(buf, row, base + 2, j) << 4)) - 16
    return _f16(buf, row, base) * q.astype(F32)


def _q5_1(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    base, j = k // 32 * 24, k % 32
    q = _nibble(_byte(buf, row, base + 8 + j % 16), j // 16) | (_high_bit(buf, row, base + 4, j) << 4)
    return _f16(buf, row, base) * q.astype(F32) + _f16(buf, row, base + 2)


def _k_scale_min(buf: te.Tensor, row: Expr, scales: Expr, s: Expr) -> tuple[Expr, Expr]:
    """llama.cpp's get_scale_min_k4: sub-block s's 6-bit scale and min from the 12 scale bytes."""
    low = s < 4
    a, b = _byte(buf, row, scales + s), _byte(buf, row, scales + s + 4)
    c = _byte(buf, row, scales + tirx.max(s - 4, 0))
    sc = tirx.Select(low, a & 63, (b & 15) | ((c >> 6) << 4))
    m = tirx.Select(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, m


def _k_quant(buf: te.Tensor, row: Expr, k: Expr, qs_at: int, high: Callable[[Expr, Expr, Expr], Expr] | None,
             block_bytes: int) -> Expr:
    """Q4_K / Q5_K: 256 values in 8 sub-blocks of 32; the quants of 64 values share 32 bytes (low
    nibbles, then high nibbles); Q5_K adds a fifth bit per value."""
    base, j = k // 256 * block_bytes, k % 256
    s, chunk, half, lane = j // 32, j // 64, (j // 32) % 2, j % 32
    q = _nibble(_byte(buf, row, base + qs_at + chunk * 32 + lane), half)
    if high is not None:
        q = q | (high(base, lane, 2 * chunk + half) << 4)
    sc, m = _k_scale_min(buf, row, base + 4, s)
    d, dmin = _f16(buf, row, base), _f16(buf, row, base + 2)
    return (d * sc.astype(F32)) * q.astype(F32) - dmin * m.astype(F32)


def _q4_k(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    return _k_quant(buf, row, k, 16, None, 144)


def _q5_k(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    def high(base: Expr, lane: Expr, bit: Expr) -> Expr:
        return (_byte(buf, row, base + 16 + lane) >> bit) & 1
    return _k_quant(buf, row, k, 48, high, 176)


def _q6_k(buf: te.Tensor, row: Expr, k: Expr, fmt: QuantFormat) -> Expr:
    """256 values in two halves of 128; ql holds low nibbles (64 bytes a half), qh 2-bit highs (32
    bytes a half), 16 int8 scales of 16 values, d last."""
    base, j = k // 256 * 210, k % 256
    half, r = j // 128, j % 128
    group, lane = r // 32, r % 32
    low = _nibble(_byte(buf, row, base + 64 * half + lane + 32 * (group % 2)), group // 2)
    high = (_byte(buf, row, base + 128 + 32 * half + lane) >> (2 * group)) & 3
    q = (low | (high << 4)) - 32
    scale = tirx.reinterpret("int8", buf[row, base + 192 + 8 * half + lane // 16 + 2 * group]).astype(F32)
    return (_f16(buf, row, base + 208) * scale) * q.astype(F32)


DECODERS: dict[str, Decoder] = {
    "q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1,
    "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k,
}


def value(fmt: QuantFormat, buf: te.Tensor, row: Expr, k: Expr) -> Expr:
    """w[row, k] of a weight stored in `fmt` (rlx's group formats share their family's decoder)."""
    family = fmt.name.split("g")[0] if fmt.gguf_type is None else fmt.name
    return DECODERS[family](buf, row, k, fmt)
