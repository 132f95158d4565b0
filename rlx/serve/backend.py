"""What the server and the chat sit on: a loaded model's batched engine, tokenizer and chat template.

`load_backend` opens a checkpoint (for `--target cpu` compiled first, as `rlx compile` would:
into artifacts/NAME through the compile cache, progress on stderr) or an artifact, builds its
paged engine with a page pool of `--kv-pages` pages, a continuous-batching `Scheduler` over it
(`--max-batch`, `--max-queue`) and the `AsyncEngine` that steps it in a background thread.
Everything above works on `Backend`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlx.errors import RlxError
from rlx.runtime.async_engine import AsyncEngine
from rlx.runtime.scheduler import Scheduler
from rlx.runtime.tokenizer import Tokenizer
from rlx.serve.chat_template import ChatTemplate, load_chat_template
from rlx.serve.structured import GrammarFactory


@dataclass(frozen=True)
class EngineOptions:
    target: str = "reference"
    max_batch: int = 8
    max_queue: int = 64
    kv_pages: int | None = None   # None: kv_memory_mb's worth, else max_batch sequences of 2048 positions
    kv_memory_mb: float | None = None
    chat_template: str | None = None
    quantize: str | None = None   # a checkpoint's weights scheme (an artifact's must match)


@dataclass
class Backend:
    """A model ready to serve."""

    name: str                       # the model name clients send
    engine: AsyncEngine
    tokenizer: Tokenizer
    template: ChatTemplate
    grammars: GrammarFactory
    max_seq: int
    vocab_size: int
    eos_ids: tuple[int, ...]

    def decode(self, ids: Sequence[int]) -> str:
        """Generated text: special tokens (EOS, turn markers) are not part of it."""
        return self.tokenizer.decode(list(ids), skip_special=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """As transformers' apply_chat_template(tokenize=True): the template writes BOS itself."""
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_bos=False)

    def stats(self) -> dict[str, float]:
        """The engine's state under the metric names of `metrics.py`."""
        s = self.engine.stats()
        return {"num_requests_running": s.running, "num_requests_waiting": s.waiting,
                "kv_cache_usage_perc": s.kv_usage, "prefix_cache_queries": s.prefix_queries,
                "prefix_cache_hits": s.prefix_hits}


def _progress(message: str) -> None:
    print(f"[rlx] {message}", file=sys.stderr, flush=True)


def check_inputs(path: str | Path, options: EngineOptions) -> Path:
    """What can be refused before anything loads (a server then never binds its port for nothing)."""
    path = Path(path)
    if not path.exists():
        raise RlxError(f"{path} does not exist", hint="pass a checkpoint (HF directory or .gguf) or an artifact")
    if options.chat_template is not None:
        load_chat_template(options.chat_template, None, {})  # unreadable, invalid or unsafe: refused now
    return path


def load_backend(path: str | Path, options: EngineOptions, *, served_name: str | None = None,
                 progress: Callable[[str], None] = _progress) -> Backend:
    """Load everything a server needs (seconds to minutes: compile, weights, tokenizer)."""
    import rlx.api

    path = check_inputs(path, options)
    source: str | Path = path
    if not rlx.api.is_artifact(path) and options.target != "reference":
        progress(f"compiling {path} for {options.target} (the compile cache keeps it for next time)")
        source = rlx.api.compile(path, options.target, quantize=options.quantize, progress=True)[0]
    progress(f"loading {source}")
    model = rlx.api.load(source, target=options.target if not rlx.api.is_artifact(source) else "reference",
                         quantize=options.quantize)
    tokenizer = model.tokenizer
    paged = model.paged_model(model.pool_pages(max_batch=options.max_batch, num_pages=options.kv_pages,
                                               kv_memory_mb=options.kv_memory_mb))
    scheduler = Scheduler(paged, max_batch=options.max_batch, max_queue=options.max_queue,
                          max_tokens_per_step=max(256, options.max_batch), eos_ids=model.eos_ids)
    special = {"bos_token": tokenizer.backend.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None,
               "eos_token": tokenizer.backend.id_to_token(model.eos_ids[0]) if model.eos_ids else None}
    template = load_chat_template(options.chat_template, tokenizer.chat_template, special)
    progress(f"serving with {paged.num_pages} KV pages of {paged.page_size} positions, chat template "
             f"{template.origin}")
    return Backend(name=served_name or _default_name(path), engine=AsyncEngine(scheduler), tokenizer=tokenizer,
                   template=template, grammars=GrammarFactory.from_tokenizer(tokenizer, paged.vocab_size),
                   max_seq=min(paged.max_seq, paged.num_pages * paged.page_size), vocab_size=paged.vocab_size,
                   eos_ids=tuple(model.eos_ids))


def _default_name(path: Path) -> str:
    return path.stem if path.suffix == ".gguf" else path.name
