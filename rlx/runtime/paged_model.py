"""What the continuous-batching scheduler needs from a backend: one ragged step over a page pool.

A step carries any mix of sequences: decoding ones contribute one token, a prefilling one a
chunk of its prompt. Tokens are flattened into one row (`tokens [T]`), so the token-wise work
(embedding, linears, norms, MLP) is one GEMM over all of them and the weights are read once per
step; only attention looks at which sequence a token belongs to. Every layer's K/V lives in a
pool of fixed-size pages (`page_size` positions each); a sequence's page table row lists its pages
in position order, so position p of sequence n sits in page `page_table[n, p // page_size]`, slot
`p % page_size`, in every layer's pool. The backend writes the step's K/V into those slots, then
each token attends over its own sequence's positions `0..pos` (the last `window` of them on a
sliding-window layer), so the pages a step needs must be in the table before it runs.

The reference interpreter and the compiled CPU engine implement it (`PagedModel`); the scheduler
(`runtime/scheduler.py`) owns the pool's bookkeeping (which page is free, shared or cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class StepBatch:
    """One ragged step. T tokens over N sequences; all arrays int32."""

    tokens: np.ndarray       # [T] token ids
    positions: np.ndarray    # [T] each token's position in its own sequence
    token_seq: np.ndarray    # [T] the page-table row (0..N-1) each token belongs to
    page_table: np.ndarray   # [N, max_pages] page ids; entries past a sequence's last page are ignored
    logit_rows: np.ndarray   # [N] for each sequence, the index in `tokens` whose logits to return

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.logit_rows.shape[0])


class PagedModel(Protocol):
    name: str
    vocab_size: int
    max_seq: int      # the longest sequence (prompt + generated) a page table may describe
    page_size: int    # positions per page
    num_pages: int    # pages in the pool (fixed when the model is created)

    def forward(self, batch: StepBatch) -> np.ndarray:
        """Write the step's K/V into its pages, run it, return float32 logits [N, vocab]: row n
        is the logits of token `logit_rows[n]`."""
        ...
