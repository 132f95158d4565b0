"""The safetensors container, as rlx reads and writes it without the library's mmap.

    [u64 little-endian header size][JSON header, padded to 8 bytes][tensor bytes...]

The header maps each tensor name to {dtype, shape, data_offsets} (offsets relative to the end
of the header); the optional `__metadata__` entry is dropped. Checkpoint reading (mmapped,
frontends.weights), artifact weights (written streaming by compile, read straight into device
tensors by the artifact engine) and the compare report (sizes) all go through here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# numpy / TVM dtype name -> the safetensors dtype code
DTYPE_CODES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                               "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8"}
DTYPE_NAMES: dict[str, str] = {code: name for name, code in DTYPE_CODES.items()}


def read_header(f: BinaryIO) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor entries, absolute offset of the data); raises struct.error / ValueError on garbage."""
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + size


def tensor_bytes(path: Path) -> int:
    """Tensor bytes of a file, from its header alone."""
    with open(path, "rb") as f:
        header, _ = read_header(f)
    return sum(end - start for start, end in (info["data_offsets"] for info in header.values()))


def write_streaming(path: Path, entries: Sequence[tuple[str, str, Sequence[int]]],
                    produce: Callable[[str], np.ndarray]) -> None:
    """Write tensors (name, dtype name, shape) one at a time: the header is known up front, each
    tensor is produced, written and dropped, so the whole set is never in memory at once."""
    header: dict[str, Any] = {}
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
