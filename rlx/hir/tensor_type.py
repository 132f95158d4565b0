"""The type of an HIR value: element dtype plus a (possibly symbolic) shape, and for a quantized
weight the block format it is stored in (`rlx.hir.quant`; text form `q8_0[262144, 640]`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlx.hir.dtypes import DType
from rlx.hir.quant import is_quant_name, known_formats, looks_quantized, quant_format
from rlx.hir.shapes import Shape, format_shape, parse_shape

_TYPE = re.compile(r"^\s*(\w+)(\[.*\])\s*$")


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape
    quant: str | None = None  # a format of rlx.hir.quant: stored in blocks, read as `dtype` (float32)

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: Shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape), self.quant)

    def with_dtype(self, dtype: DType) -> TensorType:
        """This type with another element dtype. A quantized type has none to change: its blocks
        are read as float32, and dropping `quant` would silently turn blocks into a dense tensor
        (`with_quant(None)` says that on purpose)."""
        if self.quant is not None:
            raise ValueError(f"{self} is quantized: its dtype is the float32 its blocks are read as; "
                             "dequantize it first (with_quant(None)) to change the dtype")
        return TensorType(dtype, self.shape)

    def with_quant(self, quant: str | None) -> TensorType:
        return TensorType(DType.F32 if quant else self.dtype, self.shape, quant)

    def __str__(self) -> str:
        return f"{self.quant or self.dtype.value}{format_shape(self.shape)}"

    @staticmethod
    def parse(text: str) -> TensorType:
        m = _TYPE.match(text)
        if not m:
            raise ValueError(f"bad type {text!r}: expected e.g. f32[BATCH, SEQ, 640]")
        name, shape = m.group(1), parse_shape(m.group(2))
        if is_quant_name(name):
            return TensorType(DType.F32, shape, name)
        if looks_quantized(name):
            try:
                quant_format(name)
            except ValueError as e:  # an unknown format: the message lists the known ones
                raise ValueError(f"bad type {text!r}: {e}") from None
        try:
            return TensorType(DType.parse(name), shape)
        except ValueError:
            dtypes = ", ".join(d.value for d in DType)
            raise ValueError(f"bad type {text!r}: unknown element type {name!r} (dtypes: {dtypes}; quantized "
                             f"formats: {known_formats()})") from None
