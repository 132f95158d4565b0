"""The run loop over a compiled module: one VM, uploaded weights, engine-owned KV cache buffers.

Shared by the in-process compile (`CompiledEngine`) and the artifact loader (`ArtifactEngine`);
it imports only TVM's runtime, so running an artifact never loads the compiler library.

KV cache: the functions take `cache_*` buffers [B, H, KV_CAP, D] (see `rlx/targets/kv_cache.py`)
and write each call's new rows into them in place at offset PAST_SEQ, which arrives as a shape
argument. The engine allocates the buffers at prefill with the capacity the caller reserved
(`generate` reserves prompt + new tokens) and, if a step runs past it, grows them by doubling
(one copy, amortised O(1) per token; never beyond the compiled max seq). A sliding-window
layer's buffer on CPU is a ring (`KV_WINDOW_<W>` rows, `rlx/targets/kv_cache.py`) sized by the
longest call the engine makes.

Long prompts run in chunks of `prefill_chunk` tokens (the prefill entry appends to the cache
at PAST_SEQ like a decode step): activations stay those of one chunk and sliding-window rings
stay W + chunk - 1 rows, so an 8000-token prompt's memory is its full layers' K/V, not
8000-row activations on every layer. Artifacts whose prefill takes no past run in one call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

import rlx.progress as progress
from rlx.errors import RunError
from rlx.frontends.config import GemmaConfig
from rlx.hir import conventions as cv
from rlx.hir.pass_manager import PassReport
from rlx.hir.shapes import BATCH, PAST_SEQ, dim_symbols, eval_shape
from rlx.hir.tensor_type import TensorType
from rlx.runtime.buckets import DECODE, PREFILL, PREFILL_CHUNK, choose, entry, longest_call, padded_feeds

# device kind of a target -> the TVM device its module runs on
DEVICES: dict[str, Callable[[int], tvm.runtime.Device]] = {"cpu": tvm.cpu, "cuda": tvm.cuda, "metal": tvm.metal}


class EntryLike(Protocol):
    """What the run loop reads of a function's calling convention (`lower.Signature` or the
    manifest's `EntrySignature`; read-only, as both are frozen)."""

    @property
    def function(self) -> str: ...
    @property
    def inputs(self) -> tuple[tuple[str, TensorType], ...]: ...
    @property
    def caches(self) -> tuple[tuple[str, TensorType], ...]: ...
    @property
    def dims(self) -> tuple[str, ...]: ...
    @property
    def outputs(self) -> tuple[str, ...]: ...
    @property
    def params(self) -> Sequence[Any]: ...  # each has `.key`


class VMEngine:
    """The Engine protocol (`prefill`, `step`) given a VM, weights by key and signatures; the
    subclasses only say where those come from."""

    name: str
    max_seq: int
    config: GemmaConfig
    reports: Mapping[str, PassReport]
    device: tvm.runtime.Device
    signatures: Mapping[str, EntryLike]
    buckets: tuple[int, ...] = ()  # static prefill entries (`prefill_buckets`)
    prefill_chunk: int = PREFILL_CHUNK
    _vm: VirtualMachine
    _weights: dict[str, tvm.runtime.Tensor]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @staticmethod
    def _set_threads(threads: int | None) -> None:
        """Size TVM's CPU thread pool: `[backend.<target>] threads`, else TVM_NUM_THREADS, else every
        core this process may use. (TVM's own default is half the logical cores, assuming SMT: one
        thread on a 2-core machine without SMT, which leaves half of it idle.) Process-wide, as TVM's
        pool is; its ceiling is read from TVM_NUM_THREADS when the pool starts, so that is set
        too: before the first kernel any count applies, later only lower ones."""
        count = threads or int(os.environ.get("TVM_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
        os.environ["TVM_NUM_THREADS"] = str(count)
        tvm.get_global_func("runtime.config_threadpool")(1, count)  # 1: TVM's "big cores" mode

    def _reset(self) -> None:
        self._caches: dict[str, tvm.runtime.Tensor] = {}
        self._capacity = 0
        self._pos = 0

    def _cache_types(self) -> dict[str, TensorType]:
        return {name: t for sig in self.signatures.values() for name, t in sig.caches}

    def _longest_call(self) -> int:
        """The most tokens one call appends (what a ring cache must hold beyond its window): a
        prefill chunk, padded to its bucket, or the one length a static prefill takes."""
        return max(longest_call(self.buckets, self.max_seq, self.prefill_chunk), self.fixed_prefill_length() or 0)

    def _allocate(self, capacity: int) -> None:
        """Fresh cache buffers of `capacity` positions, the first `self._pos` rows copied over (a
        ring already at its full size is kept as it is)."""
        old, kept = self._caches, self._pos
        self._caches = {}
        symbols = {s for t in self._cache_types().values() for s in dim_symbols(t.shape)}
        sizes = {BATCH: 1, **cv.cache_capacities(symbols, capacity, self._longest_call())}
        for name, t in self._cache_types().items():
            shape = eval_shape(t.shape, sizes)
            if name in old and tuple(old[name].shape) == shape:
                self._caches[name] = old[name]
                continue
            buf = tvm.runtime.empty(shape, str(t.dtype.numpy), self.device)
            if kept and name in old:
                host = np.zeros(shape, dtype=buf.dtype)
                host[:, :, :kept] = old[name].numpy()[:, :, :kept]
                buf.copyfrom(host)
            self._caches[name] = buf
        self._capacity = capacity

    def _call(self, sig: EntryLike, feeds: Mapping[str, np.ndarray]) -> dict[str, tvm.runtime.Tensor]:
        args: list[Any] = [tvm.runtime.tensor(feeds[name], self.device) for name, _ in sig.inputs]
        args.extend(self._caches[name] for name, _ in sig.caches)
        if sig.dims:
            known = {PAST_SEQ: self._pos}
            missing = [d for d in sig.dims if d not in known]
            if missing:
                raise RunError(f"{sig.function}: the engine cannot supply dims {missing}",
                               hint="compile the artifact again with this rlx")
            args.append(tvm.runtime.ShapeTuple([known[d] for d in sig.dims]))
        args.extend(self._weights[p.key] for p in sig.params)
        return dict(zip(sig.outputs, self._vm[sig.function](*args), strict=True))

    def _run(self, function: str, ids: list[int], bucket: int | None = None) -> np.ndarray:
        n = len(ids)
        if self._pos + n > self.max_seq:
            raise RunError(f"{self._pos + n} positions exceed the context of {self.max_seq}",
                           hint="shorten the prompt or lower --max-new-tokens")
        if self._pos + n > self._capacity:
            self._allocate(min(self.max_seq, max(self._pos + n, 2 * self._capacity)))
        feeds = {
            cv.INPUT_IDS: np.asarray([ids], dtype=np.int64),
            cv.POSITIONS: np.arange(self._pos, self._pos + n, dtype=np.int64)[None, :],
        }
        out = self._call(self.signatures[function], padded_feeds(feeds, bucket) if bucket else feeds)
        self._pos += n
        return out[cv.LOGITS].numpy()[0, -1]

    def _chunks(self, n: int) -> list[tuple[int, int, int | None]]:
        """(start, tokens, bucket) of each prefill call for an n-token prompt: chunks of
        `prefill_chunk` when the prefill appends to a past, each in the smallest bucket that holds
        it and ends inside the context (else the dynamic prefill)."""
        step = self.prefill_chunk if PAST_SEQ in self.signatures[PREFILL].dims else n
        plan = []
        for start in range(0, n, step):
            size = min(step, n - start)
            bucket = choose(size, self.buckets)
            plan.append((start, size, bucket if bucket is not None and start + bucket <= self.max_seq else None))
        return plan

    def prefill(self, ids: list[int], capacity: int | None = None) -> np.ndarray:
        """Run the prompt into fresh cache buffers with room for `capacity` positions, chunk by
        chunk (`_chunks`), each in the smallest prefill bucket that holds it (its pad rows land in
        the buffers too, and the next chunk overwrites them), else in the dynamic prefill."""
        if not ids:
            raise RunError("empty prompt", hint="pass --prompt TEXT or --prompt-ids 2,818,...")
        chunks = self._chunks(len(ids))
        bucket = chunks[0][2] if len(chunks) == 1 else None
        fixed = None if bucket else self.fixed_prefill_length()
        if fixed is not None and len(ids) > fixed:
            raise RunError(f"{self.name}: the prefill was compiled for prompts of exactly {fixed} tokens "
                           f"(SEQ specialized to {fixed}); this prompt has {len(ids)}",
                           hint=f"pass at most {fixed} tokens, or compile with prefill buckets instead of "
                                "specialize{SEQ=...}: `[specialize] SEQ = [32, 128]` in the profile serves "
                                "every prompt up to --max-seq")
        self._reset()
        written = max(start + (b or size) for start, size, b in chunks)  # pad rows included
        self._allocate(min(self.max_seq, max(written, capacity or 0)))
        if fixed is not None and len(ids) < fixed:
            # the static prefill has no last-token select (a bucket's), so padding would return a
            # pad row's logits: run the prompt through decode, one exact step per token instead
            for token in ids[:-1]:
                self._run(DECODE, [token])
            return self._run(DECODE, ids[-1:])
        calls = progress.track(chunks, f"prefill {len(ids)} tokens", total=len(chunks)) if len(chunks) > 1 else chunks
        for start, size, b in calls:  # (a long prompt shows its chunks when progress is on: `rlx run`)
            logits = self._run(entry(b) if b else PREFILL, ids[start:start + size], b)
        return logits

    def fixed_prefill_length(self) -> int | None:
        """The one prompt length a prefill compiled with a static SEQ takes (`--passes
        specialize{SEQ=4}`); None for the usual dynamic prefill."""
        seq = dict(self.signatures[PREFILL].inputs)[cv.INPUT_IDS].shape[1]
        return seq if isinstance(seq, int) else None

    def step(self, token: int) -> np.ndarray:
        if not getattr(self, "_caches", None):
            raise RunError("step() before prefill()", hint="call prefill(prompt) first")
        return self._run(DECODE, [token])
