"""A toy `PagedModel` for the scheduler's tests: exact, cheap, and strict about its page tables.

Its "K/V" is the token id and position written into the page slot the step's table names; a
sequence's logits are a pseudo-random function (crc32-seeded) of the tokens it reads BACK from
those pages for positions 0..pos. So a wrong page table, a page handed to two live sequences, a
prefix-cache page holding other tokens, or a token fed twice or never all change the logits (or
trip the assertions), while a correct scheduler gives exactly `reference_logits(tokens)`.
"""

from __future__ import annotations

import zlib

import numpy as np

from rlx.runtime.paged_model import StepBatch


def reference_logits(tokens: list[int], vocab_size: int) -> np.ndarray:
    """The logits after `tokens` (what a single-sequence run gives)."""
    seed = zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())
    return (np.random.default_rng(seed).standard_normal(vocab_size) * 3).astype(np.float32)


class ToyPagedModel:
    name = "toy"

    def __init__(self, *, num_pages: int = 64, page_size: int = 4, max_seq: int = 96, vocab_size: int = 40) -> None:
        self.num_pages, self.page_size, self.max_seq, self.vocab_size = num_pages, page_size, max_seq, vocab_size
        self.token = np.full((num_pages, page_size), -1, dtype=np.int64)
        self.pos = np.full((num_pages, page_size), -1, dtype=np.int64)
        self.steps: list[StepBatch] = []

    def forward(self, batch: StepBatch) -> np.ndarray:
        self.steps.append(batch)
        assert batch.tokens.dtype == np.int32 and batch.page_table.dtype == np.int32
        rows, size = batch.page_table, self.page_size
        live = [set(rows[n, :-(-(int(batch.positions[batch.logit_rows[n]]) + 1) // size)].tolist())
                for n in range(batch.num_seqs)]
        for n in range(batch.num_seqs):
            written = {int(rows[n, p // size]) for p in batch.positions[batch.token_seq == n]}
            others = set().union(*(live[m] for m in range(batch.num_seqs) if m != n))
            assert not written & others, "a sequence writes a page another sequence of the step reads"
        for t in range(batch.num_tokens):
            n, p = int(batch.token_seq[t]), int(batch.positions[t])
            page, slot = rows[n, p // size], p % size
            self.token[page, slot], self.pos[page, slot] = batch.tokens[t], p
        out = np.zeros((batch.num_seqs, self.vocab_size), dtype=np.float32)
        for n in range(batch.num_seqs):
            last = int(batch.positions[batch.logit_rows[n]])
            ps = np.arange(last + 1)
            pages, slots = rows[n, ps // size], ps % size
            assert (self.pos[pages, slots] == ps).all(), "a page holds another position than the table says"
            out[n] = reference_logits(self.token[pages, slots].tolist(), self.vocab_size)
        return out
