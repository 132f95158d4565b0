"""Cheap file digests: the size plus the first and last bytes of a file, never a byte twice.

Enough to tell a truncated, extended or re-written file (its header or tail moves) from the one
recorded, at the cost of two reads on a GB of weights; `sha256` of the whole file is the full
check (artifacts' `--verify`).
"""

from __future__ import annotations

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
