"""The safetensors container, as rlx reads and writes it without the library's mmap.

    [u64 little-endian header size][JSON header, padded to 8 bytes][tensor bytes...]

The header maps each tensor name to {dtype, shape, data_offsets} (offsets relative to the end
of the header); the optional `__metadata__` string map is kept apart (`read_header_and_metadata`:
an artifact's weights record there what manifest they were compiled with). Checkpoint reading (mmapped,
frontends.weights), artifact weights (written streaming by compile, read straight into device
tensors by the artifact engine) and the compare report (sizes) all go through here.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# numpy / TVM dtype name -> the safetensors dtype code
DTYPE_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                               "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8"}
DTYPE_NAMES: dict[str, str] = {code: name for name, code in DTYPE_CODES.items()}


# bits per element of every dtype the format defines (rlx reads a subset: DTYPE_NAMES, frontends.weights);
# a header naming another dtype is corrupt or from a newer format version
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(name: str, info: Any, data_size: int) -> tuple[int, int]:
    """The (begin, end) of one tensor's bytes, after checking its entry against the data size."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: its header entry is {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"{where}: " + ("no dtype" if dtype is None else f"unknown dtype {dtype!r}"))
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where}: data_offsets {offsets} are reversed")
    if end > data_size:
        raise ValueError(f"{where}: data_offsets {offsets} run past the end of the data ({data_size} bytes): "
                         "the file is truncated")
    bits = prod(shape) * DTYPE_BITS[dtype]
    if bits != 8 * (end - begin):
        raise ValueError(f"{where}: {dtype} {shape} takes {bits / 8:g} bytes, "
                         f"data_offsets {offsets} hold {end - begin}")
    return begin, end


def read_header(f: BinaryIO) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor entries, absolute offset of the data) of the file `f` (read from its start), every
    entry checked against the file: a known dtype, a shape of non-negative integers, and
    data_offsets inside the file that hold exactly dtype x shape bytes and overlap no other
    tensor. Damage raises ValueError naming the tensor; callers add the file and their error type."""
    header, base, _ = read_header_and_metadata(f)
    return header, base


def read_header_and_metadata(f: BinaryIO) -> tuple[dict[str, dict[str, Any]], int, dict[str, str]]:
    """`read_header`, plus the `__metadata__` string map ({} when absent or not a string map)."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"the file is truncated: {size} bytes, too few for the 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > _MAX_HEADER:
        raise ValueError(f"the header length says {n} bytes, more than the format's {_MAX_HEADER}: not safetensors")
    if n > size - 8:
        raise ValueError(f"the header length says {n} bytes but only {size - 8} follow: the file is truncated "
                         "or not safetensors")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"the header is not UTF-8 (byte {err.start}: {err.reason})") from None
    except (ValueError, RecursionError) as err:
        raise ValueError(f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        metadata = {}
    spans = sorted((*_check_entry(name, info, size - 8 - n), name) for name, info in header.items())
    filled = [s for s in spans if s[1] > s[0]]  # empty tensors take no bytes
    for (_, end, first), (begin, _, second) in zip(filled, filled[1:], strict=False):
        if begin < end:
            raise ValueError(f"tensors {first!r} and {second!r} overlap (their data_offsets share bytes)")
    return header, 8 + n, metadata


def tensor_bytes(path: Path) -> int:
    """Tensor bytes of a file, from its header alone."""
    with open(path, "rb") as f:
        header, _ = read_header(f)
    return sum(end - start for start, end in (info["data_offsets"] for info in header.values()))


def write_streaming(path: Path, entries: Sequence[tuple[str, str, Sequence[int]]],
                    produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (name, dtype name, shape) one at a time: the header is known up front, each
    tensor is produced, written and dropped, so the whole set is never in memory at once.
    `metadata` becomes the header's `__metadata__` (string values, as the format requires)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype if dtype != "bfloat16" else np.uint16).itemsize
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, _, shape in entries:
            value = np.ascontiguousarray(produce(name))
            if list(value.shape) != list(shape):
                raise ValueError(f"tensor {name}: produced {list(value.shape)}, declared {list(shape)}")
            f.write(value.tobytes())
