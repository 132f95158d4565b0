"""Random paged-cache steps for the paged ops' tests: sequences at different lengths, pages
shuffled through the pool, and the same K/V laid out contiguously per sequence (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import MAX_PAGES, PAGES, SEQ, SEQS, sym
from rlx.hir.tensor_type import TensorType


@dataclass
class PagedStep:
    """One ragged step: `new[n]` tokens of sequence n after `past[n]` cached positions."""

    q: np.ndarray            # [1, Hq, T, D]
    k_new: np.ndarray        # [1, Hk, T, D]
    v_new: np.ndarray
    k_pool: np.ndarray       # [P, Hk, PAGE, D], the past positions already written
    v_pool: np.ndarray
    page_table: np.ndarray   # [N, MAX_PAGES] int32 (unused entries: -1)
    token_seq: np.ndarray    # [T] int32
    positions: np.ndarray    # [1, T] int32
    k_full: list[np.ndarray]  # per sequence: [1, Hk, past + new, D], contiguous (the reference's cache)
    v_full: list[np.ndarray]

    def feeds(self) -> dict[str, np.ndarray]:
        return {"q": self.q, "k_new": self.k_new, "v_new": self.v_new, "k_pool": self.k_pool,
                "v_pool": self.v_pool, "page_table": self.page_table, "token_seq": self.token_seq,
                "positions": self.positions}


def paged_step(past: list[int], new: list[int], *, hq: int = 4, hk: int = 2, d: int = 16, page: int = 4,
               spare_pages: int = 3, dtype: type = np.float32, seed: int = 0) -> PagedStep:
    """Tokens are interleaved across sequences (a ragged step's order is the scheduler's, not
    sorted by sequence); page ids are a random permutation of the pool."""
    rng = np.random.default_rng(seed)
    lengths = [p + n for p, n in zip(past, new, strict=True)]
    need = [-(-n // page) for n in lengths]
    pool_pages = sum(need) + spare_pages
    ids = rng.permutation(pool_pages).astype(np.int32)
    table = np.full((len(past), max(need) + 1), -1, np.int32)
    at = 0
    for n, k in enumerate(need):
        table[n, :k] = ids[at:at + k]
        at += k
    k_pool = rng.standard_normal((pool_pages, hk, page, d)).astype(dtype)  # garbage where nothing lives
    v_pool = rng.standard_normal((pool_pages, hk, page, d)).astype(dtype)
    k_full, v_full = [], []
    for n, length in enumerate(lengths):
        k_full.append(rng.standard_normal((1, hk, length, d)).astype(dtype))
        v_full.append(rng.standard_normal((1, hk, length, d)).astype(dtype))
        for j in range(past[n]):
            k_pool[table[n, j // page], :, j % page] = k_full[n][0, :, j]
            v_pool[table[n, j // page], :, j % page] = v_full[n][0, :, j]
    order = [(n, past[n] + i) for n in range(len(past)) for i in range(new[n])]
    order = [order[i] for i in rng.permutation(len(order))]
    token_seq = np.array([n for n, _ in order], np.int32)
    positions = np.array([[p for _, p in order]], np.int32)
    k_new = np.stack([k_full[n][0, :, p] for n, p in order], axis=1)[None]
    v_new = np.stack([v_full[n][0, :, p] for n, p in order], axis=1)[None]
    q = rng.standard_normal((1, hq, len(order), d)).astype(dtype)
    return PagedStep(q, k_new, v_new, k_pool, v_pool, table, token_seq, positions, k_full, v_full)


def paged_graph(*, hq: int = 4, hk: int = 2, d: int = 16, page: int = 4, dtype: DType = DType.F32,
                scale: float = 1.0, softcap: float = 0.0, window: int = 0) -> HIR:
    """Write the step's K/V into both pools, then attend: outputs `out`, `k_pool`, `v_pool`."""
    t, pages, seqs, cols = sym(SEQ), sym(PAGES), sym(SEQS), sym(MAX_PAGES)
    h = HIR("paged")
    q = h.input("q", TensorType(dtype, (1, hq, t, d)))
    new = [h.input(f"{kv}_new", TensorType(dtype, (1, hk, t, d))) for kv in "kv"]
    pools = [h.input(f"{kv}_pool", TensorType(dtype, (pages, hk, page, d))) for kv in "kv"]
    table = h.input("page_table", TensorType(DType.I32, (seqs, cols)))
    seq = h.input("token_seq", TensorType(DType.I32, (t,)))
    pos = h.input("positions", TensorType(DType.I32, (1, t)))
    written = [h.add(Op.PAGED_KV_WRITE, [pool, rows, table, seq, pos]) for pool, rows in zip(pools, new, strict=True)]
    out = h.add(Op.PAGED_ATTENTION, [q, *written, table, seq, pos],
                {"scale": scale, "softcap": softcap, "window": window})
    h.set_output("out", out)
    h.set_output("k_pool", written[0])
    h.set_output("v_pool", written[1])
    return h
