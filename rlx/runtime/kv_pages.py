"""The KV page pool's bookkeeping: which of a `PagedModel`'s pages are free, and who holds the rest.

The model owns the page storage (every layer's K/V, `num_pages` pages of `page_size` positions);
this module owns only the numbers. A page is held by reference count: a running sequence holds one
reference on each page of its page table, and the prefix cache (`prefix_cache.py`) holds one on
each page it keeps. A page whose count drops to 0 goes back on the free list at once, so the pages
of a sequence that ends or is cancelled are reusable by the very next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from rlx.errors import RunError


class PagePool:
    """Reference-counted pages `0..num_pages-1`; `allocate` is all-or-nothing (never a partial table)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise RunError(f"a KV page pool needs >= 1 page of >= 1 position, got {num_pages} x {page_size}",
                           hint="pass --kv-pages N (N >= 1)")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def pages_for(self, positions: int) -> int:
        """How many pages `positions` positions take."""
        return -(-positions // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages (one reference each), or None when fewer than `n` are free."""
        if n > len(self._free):
            return None
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def retain(self, page: int) -> None:
        """One more reference on a page that is in use (a prefix-cache hit, the cache keeping it)."""
        if self._refs[page] < 1:
            raise AssertionError(f"page {page} is free; only a held page can be shared")
        self._refs[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference on each page; a page nobody holds is free again at once."""
        for p in pages:
            if self._refs[p] < 1:
                raise AssertionError(f"page {p} released more often than held")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


DEFAULT_CONTEXT = 2048  # positions per sequence a default pool is sized for
MIB = 1 << 20


def pool_size(*, page_size: int, max_seq: int, page_bytes: int, max_batch: int,
              num_pages: int | None = None, memory_mb: float | None = None) -> int:
    """How many pages a pool gets: `num_pages` as given; else as many as `memory_mb` MiB of K/V
    buys (`page_bytes`: one page over every layer's K and V pools); else room for `max_batch`
    sequences of min(max_seq, 2048) positions, since a 32k-context model would otherwise reserve
    gigabytes for contexts nobody sends (longer requests still run, alone, or wait)."""
    if num_pages is not None and memory_mb is not None:
        raise RunError("give the KV pool as pages or as a memory budget, not both",
                       hint="drop --kv-pages or --kv-memory")
    if num_pages is not None:
        return num_pages
    if memory_mb is not None:
        pages = int(memory_mb * MIB // page_bytes)
        if pages < 1:
            raise RunError(f"--kv-memory {memory_mb:g} MiB holds no KV page: one page of {page_size} positions "
                           f"takes {page_bytes / MIB:.3f} MiB over every layer",
                           hint=f"give at least --kv-memory {page_bytes / MIB:.3f}")
        return pages
    return max_batch * -(-min(max_seq, DEFAULT_CONTEXT) // page_size)
