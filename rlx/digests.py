"""Cheap file digests: the size plus the first and last bytes of a file, never a byte twice.

Enough to tell a truncated, extended or re-written file (its header or tail moves) from the one
recorded, at the cost of two reads on a GB of weights; `sha256` of the whole file is the full
check (artifacts' `--verify`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any


def digest_edges(digest: Any, path: Path, head: int, tail: int) -> None:
    """Feed `digest` (a hashlib object) the first `head` bytes of `path` and its last `tail`."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        digest.update(fh.read(head))
        if size > head:
            fh.seek(max(head, size - tail))
            digest.update(fh.read())


@functools.cache
def source_digest() -> str:
    """sha256 of rlx's own source files: the compile cache's key holds it, so an edited or
    upgraded rlx (same version string) never serves an artifact an older compiler built."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
