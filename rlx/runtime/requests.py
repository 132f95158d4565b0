"""What one request asks of the batched engine and what it gets back.

The contract between the continuous-batching scheduler (`runtime/scheduler.py`), the Python API
(`Model.generate_batch`) and the server (`rlx serve`): plain values, validated once, at the
boundary, with the name of the offending field so the server can answer an OpenAI-shaped 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from rlx.errors import RunError

FinishReason = Literal["stop", "length", "cancelled", "error"]


class RequestError(RunError):
    """A request field is out of range; `param` names it as the request spells it."""

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


def _check(ok: bool, param: str, message: str, hint: str) -> None:
    if not ok:
        raise RequestError(f"{param} {message}", param=param, hint=hint)


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; the defaults are greedy decoding of 16 tokens."""

    max_new_tokens: int = 16
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off; keep tokens with p >= min_p * p_max
    seed: int | None = None           # per-request generator: same seed, same tokens, whatever else runs
    presence_penalty: float = 0.0     # OpenAI: subtract once per token already generated
    frequency_penalty: float = 0.0    # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0   # CTRL / HF: divide positive (multiply negative) logits of seen tokens
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop_ids: tuple[int, ...] = ()    # besides the model's EOS ids
    ignore_eos: bool = False
    logprobs: int | None = None       # None: none; 0: the chosen token's; k: and the k most likely

    def validate(self, vocab_size: int) -> SamplingParams:
        """Raise `RequestError` naming the first bad field; return self for chaining."""
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
               f"must be an integer >= 1, got {self.max_new_tokens!r}", "e.g. 32")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature",
               f"must be a finite number >= 0, got {self.temperature!r}", "0 for greedy, e.g. 0.7 to sample")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               f"must be an integer >= 0, got {self.top_k!r}", "0 keeps every token, e.g. 40")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"must be in (0, 1], got {self.top_p!r}", "1 keeps every token, e.g. 0.9")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p",
               f"must be in [0, 1], got {self.min_p!r}", "0 keeps every token, e.g. 0.05")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
               f"must be an integer in 0..2**63-1, got {self.seed!r}", "e.g. 42")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}", "0 for none")
        _check(_finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10, "repetition_penalty",
               f"must be in (0, 10], got {self.repetition_penalty!r}", "1 for none, e.g. 1.1")
        for token, bias in self.logit_bias.items():
            _check(isinstance(token, int) and 0 <= token < vocab_size, "logit_bias",
                   f"names token {token!r}, outside the vocabulary (0..{vocab_size - 1})", "use token ids")
            _check(_finite(bias) and -100 <= bias <= 100, "logit_bias",
                   f"value for token {token} must be in [-100, 100], got {bias!r}", "e.g. -100 to ban a token")
        for token in self.stop_ids:
            _check(isinstance(token, int) and 0 <= token < vocab_size, "stop_ids",
                   f"holds {token!r}, outside the vocabulary (0..{vocab_size - 1})", "use token ids")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
               f"must be an integer in 0..20, got {self.logprobs!r}", "e.g. 5")
        return self


class TokenConstraint(Protocol):
    """Structured output: which tokens may come next (a grammar matcher per sequence)."""

    def allowed(self, vocab_size: int) -> np.ndarray | None:
        """A bool mask [vocab_size] of the tokens allowed next, or None for all."""
        ...

    def accept(self, token: int) -> None:
        """The sampler chose `token`: advance."""
        ...

    def is_terminated(self) -> bool:
        """The grammar is complete: the request finishes with reason "stop"."""
        ...


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request (or the request's end without a token)."""

    request_id: str
    index: int                                   # 0 for a request's first generated token
    token: int | None                            # None on an end without a token (cancel, error)
    logprob: float | None = None                 # log-softmax of the chosen token (params.logprobs set)
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None    # set on the request's last event
    error: str | None = None                     # finish_reason "error": what went wrong
    queued_s: float | None = None                # on the first token: seconds from submit to the step that ran it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
