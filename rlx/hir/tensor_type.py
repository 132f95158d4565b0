"""The type of an HIR value: element dtype plus a (possibly symbolic) shape."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlx.hir.dtypes import DType
from rlx.hir.shapes import Shape, format_shape, parse_shape

_TYPE = re.compile(r"^\s*(\w+)(\[.*\])\s*$")


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: Shape) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> TensorType:
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.value}{format_shape(self.shape)}"

    @staticmethod
    def parse(text: str) -> TensorType:
        m = _TYPE.match(text)
        if not m:
            raise ValueError(f"bad type {text!r}: expected e.g. f32[BATCH, SEQ, 640]")
        return TensorType(DType.parse(m.group(1)), parse_shape(m.group(2)))
