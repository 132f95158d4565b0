"""The KV pool sized as pages, as a memory budget, or by default (`kv_pages.pool_size`), and the
bytes a page takes read off the engine's own pools."""

from __future__ import annotations

import numpy as np
import pytest

import rlx
from rlx.errors import RunError
from rlx.runtime.kv_pages import MIB, pool_size


def test_pool_size_rules() -> None:
    common = dict(page_size=16, max_seq=32768, page_bytes=MIB // 2, max_batch=8)
    assert pool_size(**common) == 8 * 2048 // 16          # default: max_batch sequences of 2048
    assert pool_size(**{**common, "max_seq": 100}) == 8 * 7  # a short context: ceil(100 / 16) pages each
    assert pool_size(**common, num_pages=5) == 5
    assert pool_size(**common, memory_mb=3.7) == 7           # 3.7 MiB of 0.5 MiB pages
    with pytest.raises(RunError, match="holds no KV page.*0.500 MiB"):
        pool_size(**common, memory_mb=0.25)
    with pytest.raises(RunError, match="not both"):
        pool_size(**common, num_pages=5, memory_mb=3.0)


def test_memory_budget_buys_pages_of_the_engine_s_own_size(tiny_ckpt) -> None:
    model = rlx.load(tiny_ckpt("gemma3"))
    probe = model.paged_model(3)
    held = sum(pool.nbytes for pool in probe.pools.values())  # every layer's K and V pools, 3 pages
    assert probe.page_bytes * 3 == held
    pages = model.pool_pages(kv_memory_mb=10 * probe.page_bytes / MIB)
    assert pages == 10
    scheduler = model.scheduler(kv_memory_mb=4.5 * probe.page_bytes / MIB, max_batch=2)
    assert scheduler.stats().pages_total == 4
    assert np.all([p.shape[0] == 4 for p in scheduler.model.pools.values()])
