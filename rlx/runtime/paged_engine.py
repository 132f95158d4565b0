"""Engines over the paged step graph (`GemmaFlow.paged`): the reference interpreter here, the
compiled module in `paged_vm.py`. Both implement `paged_model.PagedModel`.

What they share: a `StepBatch` is checked before anything runs (a bad page id would make a
compiled kernel read or write outside its pool, so it is a `RunError`, never a crash), then
turned into the graph's feeds (`step_feeds`): ids and positions [1, T] int64 (as every graph
takes them), the page table padded to the graph's width.

The reference engine holds each layer's pools as numpy arrays; a step's `present_*_pages`
outputs become the next step's pools (the interpreter's `paged_kv_write` is functional).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from rlx.errors import RunError
from rlx.hir import conventions as cv
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter, WeightSource
from rlx.hir.quant import QuantizedArray
from rlx.hir.shapes import PAGES, eval_shape
from rlx.hir.tensor_type import TensorType
from rlx.runtime.paged_model import PagedModel, StepBatch

STEP = "step"  # the dynamic entry (any number of tokens and sequences); `step_<b>` the static buckets
HINT = "build the StepBatch from the scheduler's page tables (rlx.runtime.paged_model describes it)"


def check_batch(batch: StepBatch, *, vocab_size: int, num_pages: int, page_size: int, max_seq: int) -> None:
    """Every index a step will follow is in range: token ids, positions, token -> sequence rows,
    logit rows and the pages each sequence's positions 0..max(p) sit in."""
    t, n = batch.num_tokens, batch.num_seqs
    shapes = {"tokens": (batch.tokens, (t,)), "positions": (batch.positions, (t,)),
              "token_seq": (batch.token_seq, (t,)), "logit_rows": (batch.logit_rows, (n,))}
    for name, (value, shape) in shapes.items():
        if np.shape(value) != shape:
            raise RunError(f"StepBatch.{name} has shape {np.shape(value)}, expected {shape}", hint=HINT)
    table = np.asarray(batch.page_table)
    if t == 0 or n == 0 or table.ndim != 2 or table.shape[0] != n:
        raise RunError(f"StepBatch: {t} tokens, {n} sequences, page_table {table.shape}: a step needs >= 1 token "
                       "and one page-table row per sequence", hint=HINT)
    _in_range("token id", batch.tokens, vocab_size)
    _in_range("position", batch.positions, max_seq, what=f"the context of {max_seq}")
    _in_range("token_seq", batch.token_seq, n, what=f"the {n} page-table rows")
    _in_range("logit_rows", batch.logit_rows, t, what=f"the {t} tokens")
    pages = pages_read(batch, page_size)
    if int(pages.max()) > table.shape[1]:
        row = int(np.argmax(pages > table.shape[1]))
        raise RunError(f"sequence {row} reaches page {int(pages[row]) - 1}, past its page table of {table.shape[1]} "
                       f"pages x {page_size}", hint=HINT)
    used = table[np.arange(table.shape[1])[None, :] < pages[:, None]]
    _in_range("page id", used, num_pages, what=f"the pool's {num_pages} pages")


def pages_read(batch: StepBatch, page_size: int) -> np.ndarray:
    """How many pages of its table row each sequence reads: those of positions 0..its last token's
    (0 for a row without tokens)."""
    last = np.full(batch.num_seqs, -1, np.int64)
    np.maximum.at(last, np.asarray(batch.token_seq, np.int64), np.asarray(batch.positions, np.int64))
    return last // page_size + 1


def _in_range(name: str, values: np.ndarray, limit: int, what: str | None = None) -> None:
    values = np.asarray(values)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= limit):
        bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
        raise RunError(f"StepBatch: {name} {bad} is outside {what or f'0..{limit - 1}'}", hint=HINT)


def step_feeds(batch: StepBatch, max_pages: int, page_size: int) -> dict[str, np.ndarray]:
    """The step graph's inputs (less the pools) for a checked batch. Page-table entries past the
    pages a sequence reads are the caller's to leave stale: they become page 0, so no kernel ever
    sees an id outside the pool."""
    table = np.array(batch.page_table, np.int32)[:, :max_pages]
    if table.shape[1] < max_pages:
        table = np.pad(table, ((0, 0), (0, max_pages - table.shape[1])))
    table[np.arange(max_pages)[None, :] >= pages_read(batch, page_size)[:, None]] = 0
    return {
        cv.INPUT_IDS: np.asarray(batch.tokens, np.int64)[None, :],
        cv.POSITIONS: np.asarray(batch.positions, np.int64)[None, :],
        cv.TOKEN_SEQ: np.asarray(batch.token_seq, np.int32),
        cv.PAGE_TABLE: np.ascontiguousarray(table),
        cv.LOGIT_ROWS: np.asarray(batch.logit_rows, np.int32),
    }


def step_entry(bucket: int) -> str:
    return f"{STEP}_{bucket}"


def step_bucket(tokens: int, seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest static step (SEQ = SEQS = b) that holds the batch; None: the dynamic one."""
    return next((b for b in sorted(buckets) if b >= max(tokens, seqs)), None)


class PagedEngine(PagedModel, Protocol):
    """A `PagedModel` that can hand out another over the same graph or module and weights, with
    pools of its own (`rlx.load(...).paged_model` builds a step once per page size)."""

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes over every layer's K and V pools (what a memory budget buys)."""
        ...

    def with_pool(self, num_pages: int) -> PagedEngine: ...


def page_bytes(types: Mapping[str, TensorType], layout: cv.PagedLayout) -> int:
    """Bytes of one page of every pool of `layout`, from the pools' input types."""
    return sum(math.prod(eval_shape(types[p.input].shape, {PAGES: 1})) * np.dtype(types[p.input].dtype.numpy).itemsize
               for p in layout.pools)


def paged_layout_of(step: HIR) -> cv.PagedLayout:
    layout = cv.paged_layout(step)
    if layout is None:
        raise RunError(f"graph {step.name} is not a paged step graph", hint="build it with GemmaFlow(...).paged()")
    return layout


class PagedReferenceEngine:
    """The `PagedModel` of the reference target: the step graph run by the interpreter, the pools
    numpy arrays (zeros at creation) owned here."""

    name = "reference"

    def __init__(self, step: HIR, weights: WeightSource, *, num_pages: int, vocab_size: int,
                 quantized: dict[str, QuantizedArray] | None = None) -> None:
        """`quantized`: the quantized-weight cache of the single-sequence reference engine over the
        same weights, so each quantized weight is held once."""
        self.step_graph = step
        self.layout = paged_layout_of(step)
        self.page_size, self.max_seq = self.layout.page_size, self.layout.max_seq
        self.vocab_size = vocab_size
        self._interp = Interpreter(step, weights, quantized)
        self.page_bytes = page_bytes({p.input: step.inputs[p.input].type for p in self.layout.pools}, self.layout)
        self._allocate(num_pages)

    def with_pool(self, num_pages: int) -> PagedReferenceEngine:
        """Another engine over the same graph and interpreter (weights), with pools of its own."""
        other = copy.copy(self)
        other._allocate(num_pages)
        return other

    def _allocate(self, num_pages: int) -> None:
        if num_pages < 1:
            raise RunError(f"a page pool needs >= 1 page, got {num_pages}", hint="pass num_pages >= 1")
        self.num_pages = num_pages
        self.pools: dict[str, np.ndarray] = {}
        for pool in self.layout.pools:
            t = self.step_graph.inputs[pool.input].type
            self.pools[pool.input] = np.zeros(eval_shape(t.shape, {PAGES: num_pages}), t.dtype.numpy)

    def forward(self, batch: StepBatch) -> np.ndarray:
        check_batch(batch, vocab_size=self.vocab_size, num_pages=self.num_pages, page_size=self.page_size,
                    max_seq=self.max_seq)
        out = self._interp.run({**step_feeds(batch, self.layout.max_pages, self.page_size), **self.pools})
        self.pools = {p.input: out[p.output] for p in self.layout.pools}
        return np.asarray(out[cv.LOGITS][0], np.float32)

    def pool(self, layer: int, kind: str) -> np.ndarray:
        """Layer `layer`'s K or V pool [pages, kv_heads, page_size, head_dim] (tests read it)."""
        return self.pools[next(p.input for p in self.layout.pools if (p.layer, p.kind) == (layer, kind))]
