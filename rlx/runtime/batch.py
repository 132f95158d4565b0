"""Many prompts to completion through the scheduler, for `Model.generate_batch`.

The batch counterpart of `generate.generate`: every prompt becomes a request of one `Scheduler`
over a `PagedModel`, they run together (continuous batching: a finished one's slot goes to the
next), and each comes back as the `Generation` the single-sequence loop would have given, in the
order given. Requests are all validated before the first step, so a bad one costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from rlx.errors import RunError
from rlx.runtime.generate import Generation
from rlx.runtime.paged_model import PagedModel
from rlx.runtime.requests import SamplingParams
from rlx.runtime.scheduler import Scheduler


def pages_for_batch(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *, page_size: int,
                    max_batch: int) -> int:
    """Pages for the `max_batch` largest requests at once: enough that no request is preempted."""
    need = sorted((-(-(len(p) + q.max_new_tokens - 1) // page_size) for p, q in zip(prompts, params, strict=True)),
                  reverse=True)
    return max(sum(need[:max_batch]), 1)


def generate_batch(model: PagedModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
                   eos_ids: Sequence[int] = (), max_batch: int = 8, max_tokens_per_step: int = 256,
                   keep_logits: bool = False) -> list[Generation]:
    """One `Generation` per prompt, in order. `prefill_s` is each request's time to its first token
    (queueing included), `decode_s` the time from there to its last; `stopped_at_eos` is True for
    finish_reason "stop" (an EOS or stop id)."""
    if len(prompts) != len(params):
        raise RunError(f"{len(prompts)} prompts but {len(params)} sampling settings", hint="give one per prompt")
    if not prompts:
        return []
    logits: dict[str, list[np.ndarray]] = {}
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=len(prompts),
                          max_tokens_per_step=max(max_tokens_per_step, max_batch), eos_ids=eos_ids,
                          on_logits=(lambda rid, row: logits.setdefault(rid, []).append(np.array(row)))
                          if keep_logits else None)
    for p, q in zip(prompts, params, strict=True):
        scheduler.check(p, q)
    ids = [scheduler.submit(p, q) for p, q in zip(prompts, params, strict=True)]
    gens = {rid: Generation(list(p)) for rid, p in zip(ids, prompts, strict=True)}
    start = time.perf_counter()
    first: dict[str, float] = {}
    for event in scheduler.run():
        gen, now = gens[event.request_id], time.perf_counter()
        if event.finish_reason == "error":
            raise RunError(f"request {ids.index(event.request_id)} of the batch failed: {event.error}",
                           hint="a numerics problem in the model or its weights: check the checkpoint, or run "
                                "--target reference to compare")
        if event.token is not None:
            if event.index == 0:
                first[event.request_id] = now
                gen.prefill_s = now - start
            gen.tokens.append(event.token)
        if event.finished:
            gen.stopped_at_eos = event.finish_reason == "stop"
            gen.decode_s = now - first.get(event.request_id, now)
            gen.logits = logits.pop(event.request_id, [])
    return [gens[rid] for rid in ids]
