"""Quantized weight formats: how a row of values is stored in blocks, and their numpy reference.

A quantized HIR value has a `TensorType` whose `quant` names one of these formats (text form
`q8_0[262144, 640]`): logically a float32 matrix, stored as blocks of `block` consecutive values
along its last axis, `block_bytes` each, in a uint8 array [..., row_bytes]. Only weights are
quantized (the `quantize` pass decides which), and only a few ops read them (`READERS`).

Two families:
- **GGUF's own blocks** (`q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q4_k`, `q5_k`, `q6_k`): the
  bytes are llama.cpp's block structs exactly; a GGUF checkpoint's tensors keep them as stored
  (`--quantize gguf`). Their numpy reference is the `gguf` package's (`gguf.quants`).
- **rlx's group formats** (`--quantize q8` / `q4` / `q4a`): Q8_0 / Q4_0 / Q4_1's block layout
  with any group size `g` (a multiple of 32): one f16 scale (and for `q4_1` an f16 minimum) per
  `g` values. At g = 32 they *are* q8_0 / q4_0 / q4_1, byte for byte, which is how their
  quantizers are checked against `gguf.quants`; other group sizes are named `q4_0g64` etc.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import numpy as np

F16 = np.float16


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block: int                # values per block
    block_bytes: int          # bytes per block
    gguf_type: str | None     # the GGMLQuantizationType whose block this is, byte for byte
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]        # uint8 [n, block_bytes] -> f32 [n, block]
    quantize_blocks: Callable[[np.ndarray], np.ndarray] | None   # f32 [n, block] -> uint8 [n, block_bytes]
    bits: float               # storage bits per value, scales included

    def row_bytes(self, k: int) -> int:
        return k // self.block * self.block_bytes

    def fits(self, k: int) -> bool:
        return k % self.block == 0

    def quantize(self, w: np.ndarray) -> np.ndarray:
        """float [..., K] -> uint8 [..., K / block * block_bytes]."""
        if self.quantize_blocks is None:
            raise ValueError(f"{self.name} cannot be computed from floats here (only read as stored in a GGUF)")
        w = np.ascontiguousarray(w, dtype=np.float32)
        blocks = self.quantize_blocks(w.reshape(-1, self.block))
        return blocks.reshape(*w.shape[:-1], self.row_bytes(w.shape[-1]))

    def dequantize(self, packed: np.ndarray) -> np.ndarray:
        """uint8 [..., row_bytes] -> float32 [..., K]."""
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        values = self.dequantize_blocks(packed.reshape(-1, self.block_bytes))
        k = packed.shape[-1] // self.block_bytes * self.block
        return values.astype(np.float32, copy=False).reshape(*packed.shape[:-1], k)


# ---- rlx's group formats (the Q8_0 / Q4_0 / Q4_1 math with any group size) ----

def _scale_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(F16).view(np.uint8).reshape(d.shape[0], 2)


def _scale(blocks: np.ndarray, at: int = 0) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(F16).astype(np.float32)


def _q8_quantize(x: np.ndarray) -> np.ndarray:
    """Q8_0 (gguf.quants.Q8_0): d = max|x| / 127, q = round-half-away(x * (1 / d))."""
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(d == 0, 0, np.float32(1) / d)
        # times the reciprocal, as ggml (x / d differs in the last bit, and then in rounding); 1 / d
        # overflows only in blocks below ~1e-37, whose f16 scale is 0 anyway: keep q defined there
        q = np.nan_to_num(x * inv).clip(-127, 127)
    a = np.abs(q)
    q = np.sign(q) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))  # ggml's roundf, exact (a + 0.5 rounds)
    return np.concatenate([_scale_bytes(d), q.astype(np.int8).view(np.uint8)], axis=-1)


def _q8_dequantize(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Value j of the first half in the low nibble of byte j, value j of the second in its high one."""
    half = q.shape[-1] // 2
    return (q[:, :half] | (q[:, half:] << np.uint8(4))).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & np.uint8(0x0F), b >> np.uint8(4)], axis=-1)


def _q4_0_quantize(x: np.ndarray) -> np.ndarray:
    """Q4_0 (gguf.quants.Q4_0): d = (the value of largest magnitude) / -8, q = trunc(x / d + 8.5)."""
    imax = np.abs(x).argmax(axis=-1)[:, None]
    d = np.take_along_axis(x, imax, axis=-1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, np.float32(1) / d)
    q = np.trunc(x * inv + np.float32(8.5)).astype(np.float32).clip(0, 15).astype(np.uint8)
    return np.concatenate([_scale_bytes(d), _pack_nibbles(q)], axis=-1)


def _q4_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    q = _unpack_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return _scale(blocks) * q.astype(np.float32)


def _q4_1_quantize(x: np.ndarray) -> np.ndarray:
    """Q4_1 (gguf.quants.Q4_1): d = (max - min) / 15, m = min, q = trunc((x - m) / d + 0.5)."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, np.float32(1) / d)
    q = np.trunc((x - lo) * inv + np.float32(0.5)).astype(np.float32).clip(0, 15).astype(np.uint8)
    return np.concatenate([_scale_bytes(d), _scale_bytes(lo), _pack_nibbles(q)], axis=-1)


def _q4_1_dequantize(blocks: np.ndarray) -> np.ndarray:
    q = _unpack_nibbles(blocks[:, 4:]).astype(np.float32)
    return _scale(blocks) * q + _scale(blocks, 2)


@dataclass(frozen=True)
class _Group:
    """One of rlx's group families: its GGUF twin at g = 32 and its numpy code."""

    base: str
    scale_bytes: int
    value_bits: int
    quantize: Callable[[np.ndarray], np.ndarray]
    dequantize: Callable[[np.ndarray], np.ndarray]

    def format(self, group: int) -> QuantFormat:
        name = self.base if group == 32 else f"{self.base}g{group}"
        return QuantFormat(name, group, self.scale_bytes + group * self.value_bits // 8,
                           self.base.upper() if group == 32 else None, self.dequantize, self.quantize,
                           self.value_bits + 8 * self.scale_bytes / group)


GROUPS: dict[str, _Group] = {
    "q8_0": _Group("q8_0", 2, 8, _q8_quantize, _q8_dequantize),
    "q4_0": _Group("q4_0", 2, 4, _q4_0_quantize, _q4_0_dequantize),
    "q4_1": _Group("q4_1", 4, 4, _q4_1_quantize, _q4_1_dequantize),
}
GROUP_SIZES = (32, 64, 128, 256)


def _gguf_format(name: str) -> QuantFormat:
    qtype = gguf.GGMLQuantizationType[name.upper()]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    return QuantFormat(name, block, nbytes, qtype.name,
                       lambda b: gguf.quants.dequantize(b, qtype).reshape(-1, block), None, 8 * nbytes / block)


# GGUF block types rlx reads and computes with; at g = 32 rlx's group formats are three of them
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
FORMATS: dict[str, QuantFormat] = {
    **{n: _gguf_format(n) for n in GGUF_FORMATS if n not in GROUPS},
    **{f.name: f for g in GROUPS.values() for f in (g.format(s) for s in GROUP_SIZES)},
}


def known_formats() -> str:
    """The format names, for error messages: GGUF's block types, then rlx's other group sizes."""
    return ", ".join(GGUF_FORMATS) + "; " + ", ".join(f"{g}g{s}" for g in GROUPS for s in GROUP_SIZES[1:])


def quant_format(name: str) -> QuantFormat:
    """The format named `name` (`q4_k`, `q8_0`, `q4_0g64`...); ValueError lists the known ones."""
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown quantized format {name!r} (known: {known_formats()})")
    return fmt


def is_quant_name(text: str) -> bool:
    return text in FORMATS


def looks_quantized(text: str) -> bool:
    """Whether a type name is written like a format (`q` and a digit: `q4_0g48`, `q3_k`), known or not."""
    return re.match(r"^q[0-9]", text) is not None


def gguf_format_of(ggml_type: str) -> QuantFormat | None:
    """The format keeping a GGUF tensor of this type as stored (None: not a block type rlx computes with)."""
    fmt = FORMATS.get(ggml_type.lower())
    return fmt if fmt is not None and fmt.gguf_type == ggml_type.upper() else None


@dataclass(frozen=True, eq=False)
class QuantizedArray:
    """A quantized value in the interpreter: packed blocks [..., row_bytes] plus its format.

    Equal to another QuantizedArray of the same format (by name) whose blocks have the same shape
    and bytes (`np.array_equal`, one bool: not numpy's elementwise `==`); never equal to anything
    else, an ndarray of its values included, on either side (compare `dequantize()` for that).
    Unhashable, as an ndarray is: its blocks are a mutable array."""

    format: QuantFormat
    blocks: np.ndarray
    dense: list[np.ndarray] = field(default_factory=list, repr=False)  # see `dequantized`

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedArray):
            return NotImplemented
        return self.format.name == other.format.name and np.array_equal(self.blocks, other.blocks)

    __hash__ = None  # type: ignore[assignment]  # equal by value, mutable blocks: unhashable, as ndarray
    __array_ufunc__ = None  # `ndarray == q` defers to __eq__ (one bool), not numpy's elementwise compare

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.blocks.shape[:-1], self.blocks.shape[-1] // self.format.block_bytes * self.format.block)

    def dequantize(self) -> np.ndarray:
        return self.format.dequantize(self.blocks)

    def rows(self, index: np.ndarray) -> QuantizedArray:
        """Rows along the first axis (an embedding lookup reads only the rows it needs)."""
        return QuantizedArray(self.format, self.blocks[index])


def dequantized(q: QuantizedArray) -> np.ndarray:
    """`q.dequantize()`, computed once and kept with the array (it lives as long as the array)."""
    if not q.dense:
        q.dense.append(q.dequantize())
    return q.dense[0]
