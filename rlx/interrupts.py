"""Ctrl-C and SIGTERM as one exception, `Interrupted`, that no library code swallows unnoticed.

Python raises KeyboardInterrupt for SIGINT only, and only between bytecodes: inside a long TVM
call the signal waits, and TVM's FFI may turn the exception raised in a Python callback into one
of its own errors, or drop it. So the handler also records the signal, and `check()` re-raises
it at the points that must never complete after an interrupt (an artifact's final rename).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None
_depth = 0


class Interrupted(BaseException):
    """A SIGINT / SIGTERM arrived. A BaseException, like KeyboardInterrupt, so `except Exception`
    cleanup paths let it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signum
    raise Interrupted(signum)


@contextmanager
def handle_interrupts() -> Iterator[None]:
    """Within the block, SIGINT / SIGTERM raise `Interrupted` (and are remembered for `check`).
    Nests; outside the main thread (where Python cannot install handlers) it does nothing."""
    global _depth, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS} if _depth == 0 else {}
    if _depth == 0:
        _received = None
        for s in SIGNALS:
            signal.signal(s, _handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for s, h in previous.items():
            signal.signal(s, h)


def received() -> int | None:
    """The signal that arrived under the last `handle_interrupts`, if any (kept after it ends, so
    an error raised because of it can be reported as the interrupt it was)."""
    return _received


def check() -> None:
    """Raise `Interrupted` if a signal arrived since the outermost `handle_interrupts` began,
    even if whatever ran when it arrived swallowed the exception."""
    if _received is not None:
        raise Interrupted(_received)
