"""A scripted continuous-batching walk over a `PagedModel`, and the single-sequence logits it must equal.

A schedule is a list of steps; each step lists `(sequence, n)`: feed that sequence's next n
tokens (its prompt first, in chunks; once the prompt is in, one greedy token per step, the argmax
of its previous logits). Every sequence has its own pages, taken from a given page order (so a
test can hand out shuffled, non-contiguous ids), and its page-table row is padded with a page id
that does not exist (entries past a sequence's last page must be ignored).

`single_sequence_rows` computes what each emitted row must be with the existing single-sequence
engine (`Engine.prefill` / `step`): a row at the end of a prompt chunk is the last-token logits of
a prefill of the prompt so far; a decode row is a `step` after the prefill of the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rlx.runtime.engine import Engine
from rlx.runtime.paged_model import PagedModel, StepBatch

PROMPTS = [
    [2, 17, 99, 5, 42, 200, 7, 63, 128, 11],  # longer than the tiny models' window (4)
    [2, 30, 31, 32, 33, 34],
    [2, 77, 88],
]
# sequence 0 prefills at once, sequence 1 in chunks of 4 + 2 while 0 decodes, sequence 2 joins late
SCHEDULE: list[list[tuple[int, int]]] = [
    [(0, 10), (1, 4)],
    [(0, 1), (1, 2), (2, 3)],
    [(2, 1), (0, 1), (1, 1)],
    [(0, 1), (1, 1), (2, 1)],
    [(1, 1), (2, 1), (0, 1)],
    [(0, 1), (2, 1)],
]
MISSING_PAGE = 10_000  # what page-table rows are padded with: never read


@dataclass
class Stream:
    prompt: list[int]
    pages: list[int]
    tokens: list[int] = field(default_factory=list)  # fed so far (prompt, then generated)
    rows: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (position, logits) emitted

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]


def walk(model: PagedModel, page_order: Sequence[int], prompts: Sequence[list[int]] = PROMPTS,
         schedule: Sequence[Sequence[tuple[int, int]]] = SCHEDULE) -> list[Stream]:
    longest = max(len(p) for p in prompts) + len(schedule)
    per_seq = -(-longest // model.page_size)
    order = list(page_order)
    streams = [Stream(list(p), order[i * per_seq:(i + 1) * per_seq]) for i, p in enumerate(prompts)]
    for plan in schedule:
        tokens, positions, owner, rows = [], [], [], []
        for row, (s, n) in enumerate(plan):
            st = streams[s]
            for _ in range(n):
                fed = len(st.tokens)
                st.tokens.append(st.prompt[fed] if fed < len(st.prompt) else int(np.argmax(st.rows[-1][1])))
                tokens.append(st.tokens[-1])
                positions.append(fed)
                owner.append(row)
            rows.append(len(tokens) - 1)
        width = max(len(streams[s].pages) for s, _ in plan) + 1
        table = np.full((len(plan), width), MISSING_PAGE, np.int32)
        for row, (s, _) in enumerate(plan):
            table[row, :len(streams[s].pages)] = streams[s].pages
        i32 = lambda v: np.asarray(v, np.int32)  # noqa: E731
        logits = model.forward(StepBatch(i32(tokens), i32(positions), i32(owner), table, i32(rows)))
        assert logits.shape == (len(plan), model.vocab_size) and logits.dtype == np.float32
        for row, (s, _) in enumerate(plan):
            streams[s].rows.append((len(streams[s].tokens) - 1, logits[row]))
    return streams


def single_sequence_rows(engine: Engine, stream: Stream) -> np.ndarray:
    """What each row of `stream` must be, from the single-sequence engine."""
    last = len(stream.prompt) - 1
    out = {p: engine.prefill(stream.prompt[:p + 1]) for p, _ in stream.rows if p < last}
    out[last] = engine.prefill(stream.prompt)
    for i, token in enumerate(stream.generated):
        out[last + 1 + i] = engine.step(token)
    return np.stack([out[p] for p, _ in stream.rows])


def batched_rows(stream: Stream) -> np.ndarray:
    return np.stack([r for _, r in stream.rows])
