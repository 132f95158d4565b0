"""Progress output for long work (compile phases, cache hits, weight loading): one reporter, on
stderr, off unless turned on.

The CLI turns it on for the command it runs (`rlx --quiet ...` leaves it off); the Python API
leaves it off unless asked (`rlx.compile(..., progress=True)`), so a program that imports rlx
keeps its stderr to itself. The switch is a context variable: it holds for the code the
`reporting` block runs (threads started inside start with it off again).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
_on: ContextVar[bool] = ContextVar("rlx_progress", default=False)


@contextmanager
def reporting(on: bool = True) -> Iterator[None]:
    """Within the block, progress is shown (`on`) or not."""
    token = _on.set(on)
    try:
        yield
    finally:
        _on.reset(token)


def enabled() -> bool:
    return _on.get()


def say(message: str) -> None:
    """One progress line, `[rlx] message`, when reporting is on."""
    if _on.get():
        print(f"[rlx] {message}", file=sys.stderr, flush=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate, with a progress bar when reporting is on (on a non-terminal, CI or a pipe, rich
    prints only the final state)."""
    if not _on.get():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("\\[rlx] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield from progress.track(items, total=total, description=description)
