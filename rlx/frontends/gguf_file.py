"""A fast, lazy GGUF reader: metadata and tensor table parsed once, tensor bytes via mmap.

`gguf.GGUFReader` builds a numpy view per metadata element: on a 262k-token vocabulary that
takes seconds, every time the file is opened. This parser reads the same format (GGUF v2/v3)
with a few struct reads per key and leaves tensor data untouched until `array()`;
dequantization is gguf-py's.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from rlx.errors import WeightError

_VERSIONS = (2, 3)
# fixed-size metadata value types -> struct format
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_PLAIN = {  # ggml types stored as plain numbers -> numpy dtype
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are; `shape` is numpy order (GGUF `ne` reversed, i.e. HF layout)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


def _nbytes(ggml_type: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    return prod(shape) // block * size


class GGUFFile:
    """Metadata (`dict`) and tensor table of one GGUF file; `array(name)` decodes one tensor."""

    def __init__(self, path: Path, metadata: Mapping[str, Any], tensors: Mapping[str, GGUFTensorInfo],
                 buffer: Callable[[], Any]) -> None:
        self.path = path
        self.metadata = dict(metadata)
        self.tensors = dict(tensors)
        self._buffer = buffer  # the mapped file, bound late so from_reader shares gguf's memmap

    # ---- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Parse `path`; a short or corrupt file is a WeightError naming it."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                size = path.stat().st_size
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as err:
            raise WeightError(f"cannot read GGUF file {path}: {err.strerror}", hint="check the path") from err
        if mm[:4] != b"GGUF":
            raise WeightError(f"{path} is not a GGUF file (no GGUF magic)", hint="pass a .gguf file")
        try:
            metadata, tensors = _parse(mm, path)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as err:
            raise WeightError(
                f"{path} is truncated or corrupt: its GGUF header cannot be parsed ({err})",
                hint="re-download or re-convert the model",
            ) from err
        gf = cls(path, metadata, tensors, lambda: mm)
        gf._check_size(size)
        return gf

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> GGUFFile:
        """Wrap an already-open `gguf.GGUFReader` (its fields and memmap), for callers that have one."""
        metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        tensors = {
            t.name: GGUFTensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)),
                                   gguf.GGMLQuantizationType(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors
        }
        return cls(Path(reader.data.filename or "<gguf>"), metadata, tensors, lambda: reader.data)

    def _check_size(self, size: int) -> None:
        for info in self.tensors.values():
            if info.offset + info.nbytes > size:
                raise WeightError(
                    f"{self.path} is truncated: tensor {info.name} needs bytes up to "
                    f"{info.offset + info.nbytes} but the file has {size}",
                    hint="re-download or re-convert the model",
                )

    # ---- tensors ----------------------------------------------------------------------------

    def require(self, name: str, ndim: int) -> GGUFTensorInfo:
        """A tensor every reader of this file needs (the embedding...): a WeightError if it is
        missing or does not have `ndim` dimensions."""
        info = self.tensors.get(name)
        if info is None or len(info.shape) != ndim:
            what = "has no tensor" if info is None else f"has a {len(info.shape)}-D tensor"
            raise WeightError(f"{self.path} {what} {name} (expected {ndim}-D)",
                              hint="the file is not a complete model; re-convert it with llama.cpp")
        return info

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of one tensor, as a read-only uint8 view (no copy)."""
        info = self.tensors[name]
        return np.frombuffer(self._buffer(), dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def array(self, name: str) -> np.ndarray:
        """One tensor as a fresh float32 array in numpy (HF) layout."""
        info = self.tensors[name]
        raw = self.raw(name)
        plain = _PLAIN.get(info.ggml_type)
        if plain is not None:
            return raw.view(plain).astype(np.float32).reshape(info.shape)
        block, size = gguf.GGML_QUANT_SIZES[info.ggml_type]
        rows = raw.reshape(-1, info.shape[-1] // block * size)
        try:
            out = gguf.quants.dequantize(rows, info.ggml_type)
        except NotImplementedError as err:
            raise WeightError(
                f"{self.path}: tensor {name} is stored as {info.type_name}, which gguf-py cannot dequantize",
                hint="re-quantize the model with a common type (Q4_K, Q5_K, Q6_K, Q8_0, F16)",
            ) from err
        return np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)


_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: deeper is corrupt (and would exhaust the stack)


def _tensor_info(path: Path, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> GGUFTensorInfo:
    """One tensor table entry, checked: a known ggml type, at most 4 dims, rows whole blocks."""
    hint = "re-download or re-convert the model"
    if len(dims) > _MAX_DIMS:
        raise WeightError(f"{path}: tensor {name} has {len(dims)} dimensions (GGUF allows {_MAX_DIMS})", hint=hint)
    try:
        kind = gguf.GGMLQuantizationType(type_id)
        block, _ = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise WeightError(f"{path}: tensor {name} has unknown ggml type id {type_id}",
                          hint=f"{hint}; or update rlx's gguf package if the type is new") from None
    shape = tuple(int(d) for d in reversed(dims))  # GGUF stores ne[0] (the row length) first
    if dims and dims[0] % block:
        raise WeightError(f"{path}: tensor {name} has rows of {dims[0]} values, not whole {kind.name} blocks "
                          f"of {block}", hint=hint)
    return GGUFTensorInfo(name, shape, kind, offset, _nbytes(kind, shape))


def _parse(mm: Any, path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    """Metadata and tensor table; struct / Index / Unicode / ValueErrors mean damage (the caller
    names the file), a WeightError names the tensor or key that is wrong."""
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, pos)
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} (supported: {_VERSIONS})")
    pos += 20

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", mm, at)
        end = at + 8 + length
        if end > len(mm):
            raise IndexError("string runs past the end of the file")
        return mm[at + 8:end].decode("utf-8"), end

    def value(at: int, kind: int, depth: int = 0) -> tuple[Any, int]:
        if kind in _SCALAR:
            fmt = "<" + _SCALAR[kind]
            return struct.unpack_from(fmt, mm, at)[0], at + struct.calcsize(fmt)
        if kind == _STRING:
            return string(at)
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        if depth >= _MAX_NESTING:
            raise ValueError(f"arrays nested more than {_MAX_NESTING} deep")
        item, count = struct.unpack_from("<IQ", mm, at)
        at += 12
        if item in _SCALAR:
            fmt = f"<{count}{_SCALAR[item]}"
            return list(struct.unpack_from(fmt, mm, at)), at + struct.calcsize(fmt)
        items = []
        for _ in range(count):
            v, at = value(at, item, depth + 1)
            items.append(v)
        return items, at

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", mm, pos)
        metadata[key], pos = value(pos + 4, kind)

    table = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", mm, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
        pos += 4 + 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", mm, pos)
        pos += 12
        table.append((name, tuple(dims), ggml_type, offset))
    align = metadata.get("general.alignment", 32)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0:
        raise WeightError(f"{path}: GGUF key general.alignment must be a positive integer, got {align!r}",
                          hint="re-download or re-convert the model")
    data_start = (pos + align - 1) // align * align
    tensors = {name: _tensor_info(path, name, dims, ggml_type, data_start + offset)
               for name, dims, ggml_type, offset in table}
    return metadata, tensors


__all__ = ["GGUFFile", "GGUFTensorInfo"]
