"""The prefix cache: full KV pages reused by any later sequence whose tokens start the same way.

A page is cached once it is FULL (all `page_size` positions written). Its key is the chain
`(key of the page before it, the page's token ids)`, vLLM's block hash made exact: the previous
page is named by a node id this cache hands out (never reused), so two pages share a key only if
the whole token sequence from position 0 to the page's end is the same, and a key can never
collide. A new sequence looks up its prompt page by page from the start and takes a reference on
each hit (`PagePool.retain`); it then computes only the rest.

Why references and no copy-on-write: a full page is immutable. Its K/V at position p depend only
on tokens 0..p, which the key fixes, and nobody writes a full page again: a sequence only appends,
into its own last, partly filled page, and the scheduler never reuses the page that holds a
sequence's last prompt token (at least one token is always computed, to give the logits to sample
from, and it lands in a private page). So sharing is a reference count and nothing is copied.

Every layer, sliding-window ones included, keeps every position's K/V in the page (a window only
narrows which positions attention reads), so a cached prefix serves sliding-window models too:
the reused pages hold exactly what a fresh prefill would have written.

The cache holds one reference on each page it keeps. When no sequence holds a cached page any
more it stays cached, least recently used first in line, until the pool needs a page
(`evict`). Counters follow vLLM's: `queries` (prompt tokens looked up) and `hits` (tokens reused).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from rlx.runtime.kv_pages import PagePool

ROOT = 0  # the node before a sequence's first page

Key = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class CachedPage:
    node: int   # names this page as the parent in the next page's key
    page: int


class PrefixCache:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._entries: OrderedDict[Key, CachedPage] = OrderedDict()  # least recently used first
        self._next_node = ROOT + 1
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int]) -> list[CachedPage]:
        """The cached pages of `tokens`' longest prefix of whole pages, leaving at least the last
        token to compute. Touches them (most recently used); takes no references."""
        size = self.pool.page_size
        found: list[CachedPage] = []
        parent = ROOT
        for i in range((len(tokens) - 1) // size):
            entry = self._entries.get((parent, tuple(tokens[i * size:(i + 1) * size])))
            if entry is None:
                break
            self._entries.move_to_end((parent, tuple(tokens[i * size:(i + 1) * size])))
            found.append(entry)
            parent = entry.node
        return found

    def record(self, looked_up: int, reused: int) -> None:
        """Count one admitted lookup: `looked_up` tokens asked for, `reused` of them found."""
        self.queries += looked_up
        self.hits += reused

    def insert(self, parent: int, tokens: Sequence[int], page: int) -> int:
        """Offer a page that just became full (its `page_size` token ids after node `parent`);
        return the node naming it for the next page's key. If the same tokens are cached already
        (two sequences computed the same prefix at once), the cached one stays and `page` is not
        kept: it remains its sequence's private page."""
        key = (parent, tuple(tokens))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry.node
        self.pool.retain(page)
        entry = CachedPage(self._next_node, page)
        self._next_node += 1
        self._entries[key] = entry
        return entry.node

    def num_evictable(self) -> int:
        """Pages only the cache holds: the pool can have them back."""
        return sum(self.pool.refcount(e.page) == 1 for e in self._entries.values())

    def evict(self, n: int) -> int:
        """Give up to `n` pages that only the cache holds back to the pool, least recently used
        first; return how many. (A page whose parent was evicted is unreachable and goes early.)"""
        freed: list[Key] = []
        for key, entry in self._entries.items():
            if len(freed) == n:
                break
            if self.pool.refcount(entry.page) == 1:
                freed.append(key)
        for key in freed:
            self.pool.release([self._entries.pop(key).page])
        return len(freed)

    def clear(self) -> int:
        """Evict every page no sequence holds (e.g. to check that nothing else is held)."""
        return self.evict(len(self._entries))
