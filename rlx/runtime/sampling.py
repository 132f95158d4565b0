"""One request's sampler in the batched engine: its `SamplingParams` applied to its logits rows.

Each request owns one `RequestSampler` (its own seeded generator, its own token counts), so its
tokens depend only on its own logits: the same seed gives the same tokens whatever else runs in
the batch, and a preempted request that is recomputed keeps drawing from where it was.

Per step, in this order (the logits are float64 from here on):
1. `logit_bias` is added;
2. `repetition_penalty` (HF / CTRL) divides the positive logits and multiplies the negative ones
   of every token in the prompt or generated so far;
3. `frequency_penalty` x (times generated) and `presence_penalty` (once generated) are
   subtracted (OpenAI's definitions: over the generated tokens only);
4. the constraint's mask (`TokenConstraint.allowed`) sets the banned tokens to -inf.
These are the *processed logits*: `logprobs` / `top_logprobs` are their log-softmax (before the
temperature and truncation, which shape the draw, not the distribution reported). Then greedy
(temperature 0: the argmax, first id on ties) or `sampler.draw`: temperature, top-k, top-p,
min-p, the same code `rlx run`'s `Sampler` uses, so a request with a seed gives the tokens
`rlx run --seed` gives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlx.errors import RunError
from rlx.runtime.requests import SamplingParams
from rlx.runtime.sampler import Sampler, draw


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float | None = None                   # set when the request asks for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()


def params_from_sampler(sampler: Sampler | None, max_new_tokens: int) -> SamplingParams:
    """The `SamplingParams` that draw what `rlx run`'s `Sampler` draws (a fresh generator from its seed)."""
    if sampler is None:
        return SamplingParams(max_new_tokens=max_new_tokens)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=sampler.temperature, top_k=sampler.top_k,
                          top_p=sampler.top_p, seed=sampler.seed)


class RequestSampler:
    """Chooses one request's tokens; call it once per generated token, in order."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._generated: Counter[int] = Counter()
        self._seen = set(prompt_ids)  # prompt + generated: the repetition penalty's tokens
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        self._bias = np.fromiter(params.logit_bias.values(), dtype=np.float64, count=len(params.logit_bias))
        self._plain_greedy = (params.temperature == 0 and params.logprobs is None and not params.logit_bias
                              and params.repetition_penalty == 1 and not params.presence_penalty
                              and not params.frequency_penalty)

    def process(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
        """The processed logits (float64): bias, penalties, then the constraint's mask."""
        p = self.params
        z = np.array(logits, dtype=np.float64)
        if self._bias_ids.size:
            np.add.at(z, self._bias_ids, self._bias)
        if p.repetition_penalty != 1 and self._seen:
            seen = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
            z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self._generated:
            ids = np.fromiter(self._generated.keys(), dtype=np.int64, count=len(self._generated))
            counts = np.fromiter(self._generated.values(), dtype=np.float64, count=len(self._generated))
            z[ids] -= p.frequency_penalty * counts + p.presence_penalty
        if allowed is not None:
            z[~np.asarray(allowed, dtype=bool)] = -np.inf
        if not np.isfinite(z.max()):
            raise RunError("the token constraint allows no token here", hint="check the grammar or schema")
        return z

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> Choice:
        """Choose the next token from one row of logits [vocab] (finite), given the constraint's mask."""
        p = self.params
        if self._plain_greedy and allowed is None:  # nothing to process: the argmax of the row as it is
            token = int(np.argmax(logits))
            self._generated[token] += 1
            self._seen.add(token)
            return Choice(token)
        z = self.process(logits, allowed)
        if p.temperature == 0:
            token = int(np.argmax(z))
        else:
            token = draw(z / p.temperature, self._rng, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
        self._generated[token] += 1
        self._seen.add(token)
        if p.logprobs is None:
            return Choice(token)
        logp = z - z.max()
        logp -= np.log(np.exp(logp).sum())
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            k = min(p.logprobs, z.shape[0])
            best = np.argpartition(-logp, k - 1)[:k]
            best = best[np.lexsort((best, -logp[best]))]
            top = tuple((int(t), float(logp[t])) for t in best if np.isfinite(logp[t]))  # banned tokens left out
        return Choice(token, float(logp[token]), top)
