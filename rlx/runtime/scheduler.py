"""The continuous-batching scheduler: many requests, one `PagedModel.forward` per step.

Use: `submit(prompt_ids, params)` returns a request id at once (or raises `RequestError` naming
the bad field, or `QueueFull`); then call `step()` while `has_work()`: each call runs one model
step and returns the `TokenEvent`s it produced, every request's tokens in order, the last event of
a request carrying its `finish_reason` ("stop": an EOS / stop id, included as the event's token,
or the constraint terminated; "length": max_new_tokens; "cancelled"; "error", with `error`).
`cancel(request_id)` ends a request and frees its pages; `stats()` gives the numbers a server
reports. `submit`, `cancel`, `stats` and `has_work` are thread-safe and never wait for a model
step (the lock is not held during `forward`); `step` runs in one thread at a time
(`AsyncEngine` drives it from a background thread).

One step (`step()`):
1. Every running sequence contributes its next tokens, oldest first: a decoding one its one new
   token; one still prefilling (or recomputing, below) a chunk of its prompt within the step's
   token budget (`max_tokens_per_step` minus the decodes), so a long prompt is spread over steps
   and never stalls the decodes.
2. Waiting requests join, first come first served, while batch slots (`max_batch`), budget and
   pages allow. A request first takes the prefix cache's pages for the whole pages its tokens
   start with (`prefix_cache.py`) and computes only the rest. One whose first pages a running
   sequence is still computing (`n` completions of one prompt, a shared system prompt arriving
   twice) waits until they are cached, so they are computed once.
3. The step's pages are allocated (`kv_pages.py`); pages held only by the prefix cache are
   evicted, least recently used first, when the pool has too few free ones. When a running
   sequence still cannot grow, the youngest running sequence is preempted: its pages are freed
   and it waits at the head of the queue, to be recomputed (prompt and generated tokens, as one
   prefill; the prefix cache usually still has most of its pages) with its sampler state kept, so
   its tokens are the ones it would have produced anyway. A full pool never raises and never
   yields a wrong token; new requests just wait. A request that could not fit even in an empty
   pool is refused at `submit`.
4. One `StepBatch` over all of them, one `model.forward`; each sequence whose last known token
   was in the step samples its next token (`sampling.py`: its own params, seed and constraint),
   which becomes its next step's input. A request ends on EOS / a stop id (unless ignore_eos),
   its constraint terminating, or max_new_tokens, and its pages go back to the pool (full ones
   stay in the prefix cache) before `step` returns.

A request needs `len(prompt) + max_new_tokens - 1` positions (the last token is sampled, never
fed back), which must be <= `model.max_seq`; the same rule as `rlx run`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from rlx.errors import RunError
from rlx.runtime.kv_pages import PagePool
from rlx.runtime.paged_model import PagedModel, StepBatch
from rlx.runtime.prefix_cache import ROOT, PrefixCache
from rlx.runtime.requests import FinishReason, RequestError, SamplingParams, TokenConstraint, TokenEvent
from rlx.runtime.sampling import Choice, RequestSampler

log = logging.getLogger(__name__)


def _finite_rows(logits: np.ndarray) -> np.ndarray:
    """Which rows hold no NaN / inf: max and min propagate them, and neither copies the rows."""
    return np.isfinite(logits.max(axis=1)) & np.isfinite(logits.min(axis=1))


class QueueFull(RunError):
    """`max_queue` requests are waiting already: try again later (a server answers 503)."""


@dataclass(frozen=True)
class SchedulerStats:
    running: int              # sequences in the batch (prefilling or decoding)
    waiting: int              # queued, preempted ones included
    pages_used: int           # pages held by running sequences
    pages_cached: int         # pages only the prefix cache holds (free for the taking)
    pages_total: int
    prefix_queries: int       # tokens looked up in the prefix cache
    prefix_hits: int          # tokens found there (not computed again)
    preemptions: int
    prompt_tokens: int        # prompt tokens of the requests admitted
    generation_tokens: int    # tokens generated
    steps: int

    @property
    def kv_usage(self) -> float:
        """Fraction of the pool held by running sequences (vLLM's kv_cache_usage_perc)."""
        return self.pages_used / self.pages_total


@dataclass(eq=False)
class _Sequence:
    request_id: str
    tokens: list[int]                   # prompt + generated so far
    prompt_len: int
    params: SamplingParams
    sampler: RequestSampler
    constraint: TokenConstraint | None
    pages: list[int] = field(default_factory=list)   # page table row: pages in position order
    nodes: list[int] = field(default_factory=list)   # prefix-cache node of each full page offered so far
    computed: int = 0                   # positions whose K/V are in `pages`
    cancelled: bool = False             # cancel() during a step: finished when the step returns
    submitted: float = field(default_factory=time.monotonic)
    queued_s: float | None = None       # submit to the first step that runs it (set at first admission)

    @property
    def pending(self) -> int:
        """Known tokens whose K/V are not computed yet (1 while decoding)."""
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class Scheduler:
    def __init__(self, model: PagedModel, *, max_batch: int = 8, max_queue: int = 256,
                 max_tokens_per_step: int = 256, eos_ids: Sequence[int] = (), prefix_cache: bool = True,
                 on_logits: Callable[[str, np.ndarray], None] | None = None) -> None:
        """`on_logits(request_id, row)` sees each row of logits a token is sampled from (tests,
        `generate_batch(keep_logits=True)`)."""
        if max_batch < 1 or max_queue < 0:
            raise RunError(f"--max-batch must be >= 1 and --max-queue >= 0, got {max_batch} and {max_queue}",
                           hint="e.g. --max-batch 8 --max-queue 256")
        if max_tokens_per_step < max_batch:
            raise RunError(f"the step token budget ({max_tokens_per_step}) must be >= --max-batch ({max_batch})",
                           hint="every running sequence decodes one token per step; raise the budget")
        self.model = model
        self.max_batch, self.max_queue, self.max_tokens_per_step = max_batch, max_queue, max_tokens_per_step
        self.eos_ids = frozenset(eos_ids)
        self.on_logits = on_logits
        self.pool = PagePool(model.num_pages, model.page_size)
        self.cache = PrefixCache(self.pool) if prefix_cache else None
        self._table_width = self.pool.pages_for(model.max_seq)
        self._lock = threading.Lock()
        self._stepping = threading.Lock()
        self._in_step = False
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._events: list[TokenEvent] = []   # produced between steps (cancelled while waiting)
        self._ids = itertools.count()
        self._preemptions = self._prompt_tokens = self._generation_tokens = self._steps = 0

    # -- requests -----------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Validate a request without queueing it (`RequestError` naming the field); the prompt as a list."""
        vocab = self.model.vocab_size
        params.validate(vocab)
        ids = list(prompt_ids)
        if not ids:
            raise RequestError("prompt is empty", param="prompt", hint="give at least one token")
        bad = [t for t in ids if not (isinstance(t, int | np.integer) and 0 <= t < vocab)]
        if bad:
            raise RequestError(f"prompt holds token id {bad[0]!r}, outside the vocabulary (0..{vocab - 1})",
                               param="prompt", hint="pass ids the model's tokenizer produces")
        positions = len(ids) + params.max_new_tokens - 1
        if positions > self.model.max_seq:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) needs {positions} positions, "
                f"but {self.model.name} supports {self.model.max_seq}",
                param="prompt" if len(ids) >= self.model.max_seq else "max_new_tokens",
                hint="shorten the prompt or lower max_new_tokens")
        pages = self.pool.pages_for(positions)
        if pages > self.pool.num_pages:
            raise RequestError(f"the request needs {pages} KV pages of {self.pool.page_size} positions; "
                               f"the pool has {self.pool.num_pages}", param="max_new_tokens",
                               hint="lower max_new_tokens, or give the engine more --kv-pages")
        return [int(t) for t in ids]

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, constraint: TokenConstraint | None = None,
               request_id: str | None = None) -> str:
        """Queue a request; return its id (given, or `req-N`)."""
        ids = self.check(prompt_ids, params)
        sampler = RequestSampler(params, ids)
        with self._lock:
            if request_id is None:
                request_id = f"req-{next(self._ids)}"
                while request_id in self._by_id:
                    request_id = f"req-{next(self._ids)}"
            elif request_id in self._by_id:
                raise RequestError(f"request id {request_id!r} is in use", param="request_id",
                                   hint="give each request in flight its own id")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue})",
                                hint="retry later, or raise --max-queue / --max-batch")
            seq = _Sequence(request_id, ids, len(ids), params, sampler, constraint)
            self._by_id[request_id] = seq
            self._waiting.append(seq)
        return request_id

    def cancel(self, request_id: str) -> bool:
        """End a request now (its last event has finish_reason "cancelled"); False if it is not in
        flight. Its pages are freed at once, or when the step using them returns."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None or seq.cancelled:
                return False
            seq.cancelled = True
            if not (self._in_step and seq in self._running):
                self._events.append(self._finish(seq, "cancelled"))
            return True

    def cancel_all(self) -> int:
        """Cancel every request in flight (a shutdown past its grace); how many."""
        with self._lock:
            ids = list(self._by_id)
        return sum(self.cancel(request_id) for request_id in ids)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._events)

    def stats(self) -> SchedulerStats:
        with self._lock:
            cached = self.cache.num_evictable() if self.cache is not None else 0
            return SchedulerStats(
                running=len(self._running), waiting=len(self._waiting),
                pages_used=self.pool.num_used - cached, pages_cached=cached, pages_total=self.pool.num_pages,
                prefix_queries=self.cache.queries if self.cache is not None else 0,
                prefix_hits=self.cache.hits if self.cache is not None else 0,
                preemptions=self._preemptions, prompt_tokens=self._prompt_tokens,
                generation_tokens=self._generation_tokens, steps=self._steps)

    def run(self) -> Iterator[TokenEvent]:
        """Step until no work is left, yielding every event (a batch run, e.g. `generate_batch`)."""
        while self.has_work():
            yield from self.step()

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One model step over every running sequence (see the module docstring); its events."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("Scheduler.step() is running in another thread already")
        try:
            with self._lock:
                events, self._events = self._events, []
                plan = self._schedule()
                if not plan:
                    return events
                batch = self._batch(plan)
                self._in_step = True
            error = None
            try:
                logits = np.asarray(self.model.forward(batch))
            except Exception as e:  # an engine failure ends this step's requests, not the server
                log.exception("%s: step failed", self.model.name)
                error = f"{self.model.name}: the step failed: {type(e).__name__}: {e}"
            sample: list[tuple[_Sequence, int]] = []
            with self._lock:
                self._steps += 1
                for row, (seq, n) in enumerate(plan):
                    if seq.cancelled:
                        events.append(self._finish(seq, "cancelled"))
                    elif error is not None:
                        events.append(self._finish(seq, "error", error=error))
                    else:
                        seq.computed += n
                        self._offer_full_pages(seq)
                        if not seq.pending:
                            sample.append((seq, row))
            # sampling (a sort of the vocabulary per sampled row) runs outside the lock, so submit /
            # cancel / stats never wait for it; only this thread touches a running sequence's sampler
            finite_rows = _finite_rows(logits) if sample else None
            finite = [bool(finite_rows[row]) for _, row in sample] if finite_rows is not None else []
            choices = [self._choose(seq, logits[row], bool(ok)) for (seq, row), ok in zip(sample, finite, strict=True)]
            with self._lock:
                self._in_step = False
                for (seq, _), choice in zip(sample, choices, strict=True):
                    events.append(self._finish(seq, "cancelled") if seq.cancelled else self._emit(seq, choice))
            return events
        finally:
            self._stepping.release()

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """Choose each running sequence's tokens (oldest first), preempting the youngest when the
        pool runs out, then admit waiting requests; allocate the pages all of it needs."""
        plan: list[tuple[_Sequence, int]] = []
        prefill_budget = self.max_tokens_per_step - sum(s.pending == 1 for s in self._running)
        preempted = False
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            n = 1 if seq.pending == 1 else min(seq.pending, prefill_budget)
            if n == 0:
                i += 1
                continue
            while not self._grow(seq, seq.computed + n):
                victim = self._running[-1]  # the youngest: never one planned already (they are older)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                plan.append((seq, n))
                if seq.pending != 1:  # the decodes' tokens were set aside before the loop
                    prefill_budget -= n
                i += 1
        deferred: list[_Sequence] = []
        while not preempted and self._waiting and len(self._running) < self.max_batch and prefill_budget > 0:
            seq = self._waiting.popleft()
            if self._twin_is_computing(seq):
                deferred.append(seq)
                continue
            n = self._admit(seq, prefill_budget)
            if not n:
                self._waiting.appendleft(seq)
                break
            self._running.append(seq)
            plan.append((seq, n))
            prefill_budget -= n
        self._waiting.extendleft(reversed(deferred))
        return plan

    def _twin_is_computing(self, seq: _Sequence) -> bool:
        """A running sequence is still computing full pages this one starts with (the same system
        prompt, `n` completions of one prompt): wait for them to reach the prefix cache rather
        than compute them twice."""
        if self.cache is None:
            return False
        size = self.pool.page_size
        for other in self._running:
            if other.pending > 1:
                common = next((i for i, (a, b) in enumerate(zip(seq.tokens, other.tokens, strict=False)) if a != b),
                              min(len(seq.tokens), len(other.tokens)))
                shared = min(common, len(seq.tokens) - 1) // size * size
                if shared > other.computed:
                    return True
        return False

    def _admit(self, seq: _Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix and the pages of its first chunk; the chunk's
        length, or 0 (holding nothing) when the pool cannot give them without preempting."""
        hits = self.cache.lookup(seq.tokens) if self.cache is not None else []
        for hit in hits:
            self.pool.retain(hit.page)
        seq.pages, seq.nodes = [h.page for h in hits], [h.node for h in hits]
        seq.computed = len(hits) * self.pool.page_size
        n = min(seq.pending, budget)
        if not self._grow(seq, seq.computed + n):
            self._drop_pages(seq)
            return 0
        if self.cache is not None:
            self.cache.record(len(seq.tokens), seq.computed)
        if not seq.generated:
            self._prompt_tokens += seq.prompt_len
        if seq.queued_s is None:
            seq.queued_s = time.monotonic() - seq.submitted
        return n

    def _grow(self, seq: _Sequence, positions: int) -> bool:
        """Make `seq`'s pages hold `positions` positions, evicting cache-only pages if needed."""
        need = self.pool.pages_for(positions) - len(seq.pages)
        if need <= 0:
            return True
        if self.cache is not None and self.pool.num_free < need:
            self.cache.evict(need - self.pool.num_free)
        pages = self.pool.allocate(need)
        if pages is None:
            return False
        seq.pages.extend(pages)
        return True

    def _preempt(self, seq: _Sequence) -> None:
        """Free a running sequence's pages; it waits at the head of the queue to be recomputed."""
        self._drop_pages(seq)
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        self._preemptions += 1

    def _drop_pages(self, seq: _Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages, seq.nodes, seq.computed = [], [], 0

    def _batch(self, plan: list[tuple[_Sequence, int]]) -> StepBatch:
        counts = np.array([n for _, n in plan], dtype=np.int32)
        table = np.zeros((len(plan), self._table_width), dtype=np.int32)
        for row, (seq, _) in enumerate(plan):
            table[row, :len(seq.pages)] = seq.pages
        return StepBatch(
            tokens=np.array([t for seq, n in plan for t in seq.tokens[seq.computed:seq.computed + n]], dtype=np.int32),
            positions=np.concatenate([np.arange(seq.computed, seq.computed + n, dtype=np.int32) for seq, n in plan]),
            token_seq=np.repeat(np.arange(len(plan), dtype=np.int32), counts),
            page_table=table,
            logit_rows=(np.cumsum(counts) - 1).astype(np.int32))

    def _offer_full_pages(self, seq: _Sequence) -> None:
        """Put the sequence's newly full pages in the prefix cache (they are immutable from now on)."""
        if self.cache is None:
            return
        size = self.pool.page_size
        while (len(seq.nodes) + 1) * size <= seq.computed:
            i = len(seq.nodes)
            parent = seq.nodes[-1] if seq.nodes else ROOT
            seq.nodes.append(self.cache.insert(parent, seq.tokens[i * size:(i + 1) * size], seq.pages[i]))

    def _choose(self, seq: _Sequence, row: np.ndarray, finite: bool) -> Choice | str:
        """The sequence's next token from its logits row, or what went wrong."""
        if not finite:
            return f"{self.model.name}: the logits of step {seq.generated} of {seq.request_id} hold NaN or inf values"
        try:
            allowed = seq.constraint.allowed(self.model.vocab_size) if seq.constraint else None
            choice = seq.sampler(row, allowed)
            if seq.constraint:
                seq.constraint.accept(choice.token)
        except RunError as e:
            return e.message
        if self.on_logits:
            self.on_logits(seq.request_id, row)
        return choice

    def _emit(self, seq: _Sequence, choice: Choice | str) -> TokenEvent:
        """Append the chosen token; finish the request if it ends it (or if choosing failed)."""
        if isinstance(choice, str):
            return self._finish(seq, "error", error=choice)
        seq.tokens.append(choice.token)
        self._generation_tokens += 1
        stops = seq.params.stop_ids if seq.params.ignore_eos else (*self.eos_ids, *seq.params.stop_ids)
        reason: FinishReason | None = None
        if choice.token in stops or (seq.constraint is not None and seq.constraint.is_terminated()):
            reason = "stop"
        elif seq.generated >= seq.params.max_new_tokens:
            reason = "length"
        event = TokenEvent(seq.request_id, seq.generated - 1, choice.token, choice.logprob, choice.top_logprobs,
                           finish_reason=reason, queued_s=seq.queued_s if seq.generated == 1 else None)
        if reason is not None:
            self._finish(seq, reason)
        return event

    def _finish(self, seq: _Sequence, reason: FinishReason, *, error: str | None = None) -> TokenEvent:
        """Take a request out of the scheduler and free its pages; its end event (no token)."""
        self._drop_pages(seq)
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        self._by_id.pop(seq.request_id, None)
        return TokenEvent(seq.request_id, seq.generated, None, finish_reason=reason, error=error)
