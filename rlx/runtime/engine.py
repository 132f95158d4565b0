"""What a generation loop needs from a backend: prefill a prompt, then one token at a time.

The reference interpreter implements it here; compiled targets implement the same protocol, so
`rlx run` and `rlx.load(...).generate(...)` do not care which one runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from rlx.hir.pass_manager import PassReport


class Engine(Protocol):
    # read-only properties: an engine may hold them as plain attributes or compute them
    @property
    def name(self) -> str: ...
    @property
    def max_seq(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...  # prompt ids must be in 0..vocab_size-1
    @property
    def reports(self) -> Mapping[str, PassReport]: ...  # per graph ("prefill", "decode"): the passes that built it

    def prefill(self, ids: list[int], capacity: int | None = None) -> np.ndarray:
        """Reset the KV cache (room for `capacity` positions, a hint), run the prompt, return the
        last position's logits [vocab]."""
        ...

    def step(self, token: int) -> np.ndarray:
        """Append one token to the cache, return its logits [vocab]."""
        ...
