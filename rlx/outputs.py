"""Writing outputs so that a failure leaves nothing half-written.

A directory output (an artifact, a report) is filled in a hidden temp directory next to its
destination and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt so the temp directory is cleaned up like on Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replace_dir_atomic(dest: Path, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` fills a hidden temp dir next to `dest`, which then replaces `dest` by renames:
    an exception (or SIGTERM) on the way leaves `dest` as it was and no temp dir behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        with _sigterm_as_interrupt():
            fill(tmp)
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
