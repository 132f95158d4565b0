"""The paged step graph's own pieces: `GemmaFlow(cfg).paged(page_size)` builds one graph `step`
over the ragged tokens of many sequences (`rlx.runtime.paged_model` is the contract engines
implement with it).

Everything token-wise (embedding, per-layer inputs, norms, linears, MLP, MoE, RoPE by each
token's own position) is the prefill graph's, over `input_ids [1, SEQ]`: all tokens of the step
flattened into one row, so one GEMM per weight serves every sequence. What differs is where K/V
live and who attends to whom, and those are the three branches `GraphBuilder` takes here:

- **K/V** (`write`): each layer's K and V rows go into that layer's page pools
  `k_pages.i` / `v_pages.i` [PAGES, kv_heads_i, page_size, head_dim_i] with `paged_kv_write`
  (position p of sequence n: page `page_table[n, p // page_size]`, slot `p % page_size`); the
  pools after the write are outputs `present_k_pages.i` / `present_v_pages.i`, recorded as
  `conventions.PagedPool`s so engines feed their own pools and the lowering updates them in
  place. A KV-shared Gemma 4 layer reads its producer's written pools.
- **Attention** (`attend`): `paged_attention` over the written pools replaces the
  scores / scale / softcap / mask / softmax / values chain, with the layer's scale, softcap and
  window; each token sees its own sequence's positions up to its own.
- **Output rows** (`select`): the hidden rows of the tokens at `logit_rows [SEQS]` are gathered
  BEFORE the final norm and LM head, so the head runs on one row per sequence, not per token.
  The gather is an `embed` of the [SEQ, hidden] rows by `logit_rows` (a row lookup is what embed
  is). Logits come out [1, SEQS, vocab].

Custom masks, media attention bias and `prefill_from_hidden` have no paged form; `GemmaFlow.build`
refuses them by name.
"""

from __future__ import annotations

from typing import Protocol

from rlx.frontends.config import GemmaConfig
from rlx.hir import conventions as cv
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import PAGES, SEQS, Dim, sym
from rlx.hir.tensor_type import TensorType

DEFAULT_PAGE_SIZE = 16


class GraphBuilder(Protocol):
    """What the paged pieces use of `flow.GraphBuilder` (which imports this module)."""

    config: GemmaConfig
    hir: HIR
    S: Dim
    positions: str

    def op(self, op: Op, *inputs: str, name: str | None = None, role: str | None = None, **attrs: object) -> str: ...

    def _meta(self, role: str | None = None) -> dict[str, object]: ...


class AttentionSpec(Protocol):
    """What `paged_attention` takes of a layer's `flow.AttentionSpec` (read-only: it is frozen)."""

    @property
    def score_scale(self) -> float: ...
    @property
    def softcap(self) -> float: ...
    @property
    def window(self) -> int: ...


def pool_name(kind: str, layer: int) -> str:
    return f"{kind}_pages.{layer}"


def max_pages_for(max_seq: int, page_size: int) -> int:
    """Page-table columns a sequence of up to `max_seq` positions needs."""
    return -(-max_seq // page_size)


class PagedStep:
    """The paged inputs of one step graph and the nodes `GraphBuilder`'s paged branches emit."""

    def __init__(self, builder: GraphBuilder, page_size: int, max_pages: int) -> None:
        self.builder = builder
        self.page_size, self.max_pages = page_size, max_pages
        hir = builder.hir
        self.token_seq = hir.input(cv.TOKEN_SEQ, TensorType(DType.I32, (builder.S,)))
        self.page_table = hir.input(cv.PAGE_TABLE, TensorType(DType.I32, (sym(SEQS), max_pages)))
        # the page ops address with int32 (as the page table): positions cast once for all layers
        self.positions = builder.op(Op.CAST, builder.positions, name="positions.i32", dtype="i32")
        self.pools: list[cv.PagedPool] = []
        self._outputs: dict[str, str] = {}

    def _addressing(self) -> tuple[str, str, str]:
        return self.page_table, self.token_seq, self.positions

    def write(self, i: int, k: str, v: str) -> tuple[str, str]:
        """Layer i's new K / V rows [1, kv_heads, SEQ, head_dim] written into its pools; the
        written pools (what this layer, and layers sharing its K/V, attend over)."""
        b = self.builder
        written = {}
        for kind, rows in (("k", k), ("v", v)):
            _, heads, _, dim = b.hir.node(rows).type.shape
            name = pool_name(kind, i)
            pool = b.hir.add(Op.INPUT, attrs={"name": name}, name=name, meta=b._meta(),
                             type=TensorType(DType.F32, (sym(PAGES), heads, self.page_size, dim)))
            written[kind] = b.op(Op.PAGED_KV_WRITE, pool, rows, *self._addressing(), name=f"l{i}.{kind}.pages")
            output = f"present_{name}"
            self._outputs[output] = written[kind]
            self.pools.append(cv.PagedPool(i, kind, name, output))
        return written["k"], written["v"]

    def attend(self, i: int, q: str, k_pages: str, v_pages: str, spec: AttentionSpec) -> str:
        """Each token's query [1, heads, SEQ, head_dim] over its own sequence's K/V in the pools,
        with the layer's score scale, softcap and window."""
        return self.builder.op(Op.PAGED_ATTENTION, q, k_pages, v_pages, *self._addressing(), name=f"l{i}.attn",
                               scale=float(spec.score_scale), softcap=float(spec.softcap), window=int(spec.window))

    def select(self, h: str) -> str:
        """The hidden rows [1, SEQ, H] of the tokens at `logit_rows`, as [1, SEQS, H]."""
        b = self.builder
        width = b.config.hidden_size
        rows = b.hir.input(cv.LOGIT_ROWS, TensorType(DType.I32, (sym(SEQS),)))
        flat = b.op(Op.RESHAPE, h, name="logit_rows.flat", shape=(str(b.S), width))
        picked = b.op(Op.EMBED, flat, rows, name="logit_rows.gather")
        return b.op(Op.RESHAPE, picked, name="logit_rows.rows", shape=(1, SEQS, width))

    def finish(self) -> None:
        """The written pools become outputs (the pool after this step) and the layout is recorded."""
        for name, nid in self._outputs.items():
            self.builder.hir.set_output(name, nid)
        cv.record_paged(self.builder.hir, cv.PagedLayout(self.page_size, self.max_pages, tuple(self.pools)))
