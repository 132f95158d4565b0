"""The public Python API: `rlx.load(checkpoint).generate(...)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlx.errors import RlxError
from rlx.frontends.checkpoint import Checkpoint, open_checkpoint
from rlx.runtime.engine import Engine
from rlx.runtime.generate import Generation, generate
from rlx.runtime.reference import ReferenceEngine
from rlx.runtime.sampler import Sampler
from rlx.runtime.tokenizer import Tokenizer

ENGINES: dict[str, Callable[[Checkpoint], Engine]] = {
    "reference": ReferenceEngine,
}


@dataclass
class Model:
    checkpoint: Checkpoint
    engine: Engine
    _tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_checkpoint(self.checkpoint)
        return self._tokenizer

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, *, sampler: Sampler | None = None,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return generate(self.engine, ids, max_new_tokens, sampler=sampler,
                        eos_ids=self.checkpoint.config.eos_token_ids, on_token=on_token)


def load(path: str | Path, target: str = "reference") -> Model:
    """Open a checkpoint (HF directory or GGUF file) for generation on `target`."""
    if target not in ENGINES:
        raise RlxError(f"unknown target {target!r} for run", hint=f"use one of: {', '.join(ENGINES)}")
    ckpt = open_checkpoint(path)
    return Model(ckpt, ENGINES[target](ckpt))
