"""Kernels of the paged KV cache: the in-place page write and paged attention.

`paged_kv_write` is TVMScript (TE cannot write into an input): the pool is the engine's buffer,
written in place with `call_tir_inplace`, as `kernels.kv_write` does for the contiguous cache.
"""

from __future__ import annotations

from tvm import te, tirx

from rlx.targets.kernels import _product

PAGED_KV_WRITE = "rlx_paged_kv_write"
PAGED_SCORES = "rlx_paged_scores"
PAGED_VALUES = "rlx_paged_values"


def paged_kv_write(dtype: str, page: int, d: int) -> tirx.PrimFunc:
    """`pages[page_table[token_seq[t], p // PAGE], h, p % PAGE, :] = new[0, h, t, :]` with
    p = positions[0, t], in place. One function per (dtype, page size, head size)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, check_well_formed=False)
    def write(var_pages: T.handle, var_new: T.handle, var_table: T.handle, var_seq: T.handle,
              var_pos: T.handle) -> None:
        T.func_attr({"tir.noalias": True})
        n_pages, heads, tokens, seqs, cols = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        pages = T.match_buffer(var_pages, (n_pages, heads, page, d), dtype)
        new = T.match_buffer(var_new, (1, heads, tokens, d), dtype)
        table = T.match_buffer(var_table, (seqs, cols), "int32")
        seq = T.match_buffer(var_seq, (tokens,), "int32")
        pos = T.match_buffer(var_pos, (1, tokens), "int32")
        with T.sblock("root"):
            for t, h, m in T.grid(tokens, heads, d):
                with T.sblock(PAGED_KV_WRITE):
                    vt, vh, vm = T.axis.remap("SSS", [t, h, m])
                    p = T.Cast("int64", pos[0, vt])
                    slot = T.Cast("int64", table[T.Cast("int64", seq[vt]), p // page])
                    T.reads(new[0, vh, vt, vm], pos[0, vt], seq[vt], table[0:seqs, 0:cols])
                    T.writes(pages[0:n_pages, vh, 0:page, vm])
                    pages[slot, vh, p % page, vm] = new[0, vh, vt, vm]

    return write


def _key_row(pages: te.Tensor, table: te.Tensor, seq: te.Tensor, t: tirx.PrimExpr, j: tirx.PrimExpr,
             ) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(page, slot) of key position j of token t's sequence; the page id is clamped into the pool
    so that a masked key past the sequence's last page (whose table entry is ignored) reads
    memory of the pool, not past it."""
    size = pages.shape[2]
    page = table[seq[t].astype("int64"), j // size].astype("int64")
    page = tirx.max(tirx.min(page, pages.shape[0] - 1), tirx.const(0, "int64"))
    return page, j % size


def paged_scores(q: te.Tensor, k_pages: te.Tensor, table: te.Tensor, seq: te.Tensor) -> te.Tensor:
    """`q @ k^T` of each token against key positions 0..MAX_PAGES * PAGE - 1 of its sequence
    (materialised: the first, plain lowering; masked afterwards)."""
    group = int(q.shape[1]) // int(k_pages.shape[1])
    d = te.reduce_axis((0, q.shape[-1]), name="d")
    keys = table.shape[1] * k_pages.shape[2]

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, t: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
        page, slot = _key_row(k_pages, table, seq, t, j)
        return te.sum(_product(q[b, h, t, d], k_pages[page, h // group, slot, d]), axis=d)

    return te.compute((q.shape[0], q.shape[1], q.shape[2], keys), body, name=PAGED_SCORES)


def paged_values(p: te.Tensor, v_pages: te.Tensor, table: te.Tensor, seq: te.Tensor) -> te.Tensor:
    """`probs @ v` over the same key positions as `paged_scores`."""
    group = int(p.shape[1]) // int(v_pages.shape[1])
    j = te.reduce_axis((0, p.shape[-1]), name="j")

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, t: tirx.PrimExpr, e: tirx.PrimExpr) -> tirx.PrimExpr:
        page, slot = _key_row(v_pages, table, seq, t, j)
        return te.sum(_product(p[b, h, t, j], v_pages[page, h // group, slot, e]), axis=j)

    return te.compute((p.shape[0], p.shape[1], p.shape[2], v_pages.shape[3]), body, name=PAGED_VALUES)
