"""The compiled `PagedModel`: the step entries of a module run by the Relax VM (TVM's runtime only,
so an artifact's paged engine never loads the compiler).

Entries: `step` takes any number of tokens T and sequences N (dynamic SEQ / SEQS); `step_<b>`
are static copies with SEQ = SEQS = b (`compiler.graphs.DEFAULT_STEP_BUCKETS`: decode-size steps
get the GEMV schedules). A batch runs in the smallest bucket b >= T (and >= N), padded:

- pad tokens (T..b-1) belong to an extra page-table row whose pages are all the engine's
  **scratch page** (one page more than the caller's `num_pages`, never handed out), at position
  0: their K/V land there, they attend over it alone, and nothing a real token reads changes;
- pad sequences (N..b-1) read that scratch row too; their logits are dropped.

The pools are engine-owned device tensors, `num_pages + 1` pages per layer and kind, zeros at
creation, written in place by the entries (`paged_kv_write` lowers to `call_tir_inplace`), so a
step moves only its own K/V rows. Weights are the caller's tensors (shared with the single-
sequence engine of the same module or artifact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from rlx.errors import RunError
from rlx.hir import conventions as cv
from rlx.hir.shapes import PAGES, eval_shape
from rlx.runtime.paged_engine import STEP, check_batch, page_bytes, step_bucket, step_entry, step_feeds
from rlx.runtime.paged_model import StepBatch
from rlx.runtime.vm_engine import EntryLike


def pad_step(feeds: Mapping[str, np.ndarray], bucket: int, scratch: int) -> dict[str, np.ndarray]:
    """A step's feeds padded to `bucket` tokens and sequences (see the module docstring)."""
    tokens, seqs = feeds[cv.TOKEN_SEQ].shape[0], feeds[cv.LOGIT_ROWS].shape[0]
    extra_t, extra_n = bucket - tokens, bucket - seqs
    table = np.concatenate([feeds[cv.PAGE_TABLE],
                            np.full((extra_n, feeds[cv.PAGE_TABLE].shape[1]), scratch, np.int32)])
    return {
        cv.INPUT_IDS: np.pad(feeds[cv.INPUT_IDS], ((0, 0), (0, extra_t))),
        cv.POSITIONS: np.pad(feeds[cv.POSITIONS], ((0, 0), (0, extra_t))),
        cv.TOKEN_SEQ: np.pad(feeds[cv.TOKEN_SEQ], (0, extra_t), constant_values=seqs),
        cv.PAGE_TABLE: table,
        cv.LOGIT_ROWS: np.pad(feeds[cv.LOGIT_ROWS], (0, extra_n)),
    }


class PagedVMEngine:
    """`PagedModel` over a VM holding the step entries; see the module docstring."""

    def __init__(self, *, name: str, vm: VirtualMachine, device: tvm.runtime.Device,
                 weights: Mapping[str, tvm.runtime.Tensor], signatures: Mapping[str, EntryLike],
                 layout: cv.PagedLayout, buckets: Sequence[int], num_pages: int, vocab_size: int) -> None:
        if num_pages < 1:
            raise RunError(f"a page pool needs >= 1 page, got {num_pages}", hint="pass num_pages >= 1")
        if STEP not in signatures:
            raise RunError("this module has no paged step entry", hint="compile it again with this rlx")
        self.name, self.device, self._vm = name, device, vm
        self.layout = layout
        self.page_size, self.max_seq, self.num_pages = layout.page_size, layout.max_seq, num_pages
        self.vocab_size = vocab_size
        self.buckets = tuple(b for b in buckets if step_entry(b) in signatures)
        self.signatures = signatures
        self._weights = weights
        types = dict(signatures[STEP].inputs)
        self.page_bytes = page_bytes(types, layout)
        self.pools: dict[str, tvm.runtime.Tensor] = {}
        for pool in layout.pools:
            t = types[pool.input]
            shape = eval_shape(t.shape, {PAGES: num_pages + 1})  # + the scratch page pads write into
            self.pools[pool.input] = tvm.runtime.tensor(np.zeros(shape, t.dtype.numpy), device)

    def with_pool(self, num_pages: int) -> PagedVMEngine:
        """Another engine over the same module and weights, with pools of its own."""
        return PagedVMEngine(name=self.name, vm=self._vm, device=self.device, weights=self._weights,
                             signatures=self.signatures, layout=self.layout, buckets=self.buckets,
                             num_pages=num_pages, vocab_size=self.vocab_size)

    def forward(self, batch: StepBatch) -> np.ndarray:
        check_batch(batch, vocab_size=self.vocab_size, num_pages=self.num_pages, page_size=self.page_size,
                    max_seq=self.max_seq)
        feeds = step_feeds(batch, self.layout.max_pages, self.page_size)
        bucket = step_bucket(batch.num_tokens, batch.num_seqs, self.buckets)
        if bucket is not None:
            feeds = pad_step(feeds, bucket, scratch=self.num_pages)
        sig = self.signatures[step_entry(bucket) if bucket is not None else STEP]
        args: list[Any] = [self.pools[name] if name in self.pools else tvm.runtime.tensor(feeds[name], self.device)
                           for name, _ in sig.inputs]
        args.extend(self._weights[p.key] for p in sig.params)
        out = dict(zip(sig.outputs, self._vm[sig.function](*args), strict=True))
        return np.ascontiguousarray(out[cv.LOGITS].numpy()[0, :batch.num_seqs], np.float32)

    def pool(self, layer: int, kind: str) -> np.ndarray:
        """Layer `layer`'s K or V pool (scratch page last), copied to the host (tests read it)."""
        return self.pools[next(p.input for p in self.layout.pools if (p.layer, p.kind) == (layer, kind))].numpy()
