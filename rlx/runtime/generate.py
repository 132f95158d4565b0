"""The generation loop shared by every engine: prefill, then sample and step until done."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rlx.errors import RunError
from rlx.runtime.engine import Engine
from rlx.runtime.sampler import Sampler


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_at_eos: bool = False

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)  # the first token comes from the prefill
        return steps / self.decode_s if self.decode_s else 0.0

    def logits_array(self) -> np.ndarray:
        """[1 + decode steps, vocab] float32: the prefill's last-token logits, then each step's."""
        return np.stack(self.logits).astype(np.float32)


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    """A prompt every engine can embed: not empty, each id a row of the embedding table (an id
    past it would read another tensor's memory in compiled code). `run` and `compare` both ask."""
    if not prompt_ids:
        raise RunError("empty prompt", hint="pass --prompt TEXT or --prompt-ids 2,818,...")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RunError(f"prompt id {bad[0]} is outside the vocabulary (ids 0..{vocab_size - 1})"
                       + (f"; {len(bad) - 1} more" if len(bad) > 1 else ""),
                       hint="pass ids the model's tokenizer produces, or --prompt TEXT")


def generate(
    engine: Engine,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    sampler: Sampler | None = None,
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    keep_logits: bool = True,
) -> Generation:
    """Generate up to `max_new_tokens`; the last token is sampled without a further step.
    `keep_logits=False` drops each step's logits once sampled (a vocabulary row, 1 MB for Gemma 3,
    per token: a long generation would otherwise hold them all)."""
    if max_new_tokens < 1:
        raise RunError(f"--max-new-tokens must be >= 1, got {max_new_tokens}", hint="e.g. --max-new-tokens 32")
    check_prompt_ids(prompt_ids, engine.vocab_size)
    total = len(prompt_ids) + max_new_tokens - 1
    if total > engine.max_seq:
        raise RunError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens needs {total} positions, "
            f"but {engine.name} supports {engine.max_seq}",
            hint="shorten the prompt, lower --max-new-tokens, or compile with a larger --max-seq",
        )
    sampler = sampler or Sampler()
    gen = Generation(list(prompt_ids))
    t0 = time.perf_counter()
    logits = engine.prefill(list(prompt_ids), capacity=total)
    gen.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        logits = np.asarray(logits, dtype=np.float32)
        if not np.isfinite(logits).all():
            where = "the prefill" if not gen.tokens else f"decode step {len(gen.tokens)}"
            raise RunError(f"{engine.name}: the logits of {where} hold NaN or inf values; generation stopped",
                           hint="a numerics problem in the model or its weights: check the checkpoint, or run "
                                "--target reference to compare")
        if keep_logits:
            gen.logits.append(logits)
        token = sampler(logits)
        gen.tokens.append(token)
        if on_token:
            on_token(token)
        if token in eos_ids:
            gen.stopped_at_eos = True
            break
        if len(gen.tokens) >= max_new_tokens:
            break
        logits = engine.step(token)
    gen.decode_s = time.perf_counter() - t1
    return gen
