"""The public Python API: `rlx.load(checkpoint).generate(...)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlx.compiler.engines import ENGINES, PAGED_ENGINES
from rlx.compiler.profile import Profile
from rlx.compiler.profile_toml import resolve_profile
from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.paged import DEFAULT_PAGE_SIZE
from rlx.runtime.detokenizer import FILE as DETOKENIZER_FILE
from rlx.runtime.detokenizer import Detokenizer
from rlx.runtime.engine import Engine
from rlx.runtime.generate import Generation, generate
from rlx.runtime.paged_engine import PagedEngine
from rlx.runtime.sampler import Sampler
from rlx.runtime.tokenizer import Tokenizer
from rlx.targets.presets import split_targets

if TYPE_CHECKING:
    from rlx.runtime.async_engine import AsyncEngine
    from rlx.runtime.requests import SamplingParams
    from rlx.runtime.scheduler import Scheduler


@dataclass
class Model:
    """A model ready to generate: an engine plus where its tokenizer comes from (loaded lazily,
    so `--prompt-ids` runs need none)."""

    engine: Engine
    eos_ids: tuple[int, ...]
    tokenizer_from: Callable[[], Tokenizer]
    profile: Profile | None = None
    detokenizer_from: Callable[[], Detokenizer] | None = None  # a decode-only table, when there is one
    paged_from: Callable[[int, int | None], PagedEngine] | None = None  # (num_pages, page_size) -> paged engine
    _tokenizer: Tokenizer | None = None
    _paged: dict[int | None, PagedEngine] = field(default_factory=dict)  # one compiled step module per page size
    _decoder: Detokenizer | Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self.tokenizer_from()
        return self._tokenizer

    def adopt_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use an already loaded tokenizer instead of loading it again (a GGUF's takes seconds)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer

    def adopt_decoder(self, decoder: Detokenizer) -> None:
        """Use a detokenizer loaded before the weights (its parse is then not on top of them)."""
        if self._decoder is None:
            self._decoder = decoder

    def paged_model(self, num_pages: int, page_size: int | None = None) -> PagedEngine:
        """The batched engine over this model's weights (`rlx.runtime.paged_model.PagedModel`, what
        the scheduler drives) with a pool of `num_pages` pages per layer of its own. `page_size`
        None: 16 for a checkpoint, the compiled one for an artifact. The step graph is built (and
        compiled) once per page size; each call gets fresh pools."""
        if self.paged_from is None:
            raise RlxError("this model has no paged engine", hint="load it with rlx.load(checkpoint or artifact)")
        made = self._paged.get(page_size)
        if made is None:
            made = self._paged[page_size] = self.paged_from(num_pages, page_size)
            return made
        return made.with_pool(num_pages)

    @property
    def decoder(self) -> Detokenizer | Tokenizer:
        """What turns generated ids into text: the small detokenizer if the artifact has one,
        else the tokenizer (either has `decode(ids)`, with identical results)."""
        if self._decoder is None:
            self._decoder = self.detokenizer_from() if self.detokenizer_from is not None else self.tokenizer
        return self._decoder

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, *, sampler: Sampler | None = None,
                 on_token: Callable[[int], None] | None = None, keep_logits: bool = True) -> Generation:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return generate(self.engine, ids, max_new_tokens, sampler=sampler,
                        eos_ids=self.eos_ids, on_token=on_token, keep_logits=keep_logits)

    def generate_batch(self, prompts: Sequence[str | list[int]], max_new_tokens: int | Sequence[int] = 32, *,
                       sampler: Sampler | None = None, params: SamplingParams | Sequence[SamplingParams] | None = None,
                       max_batch: int = 8, keep_logits: bool = False) -> list[Generation]:
        """Generate for many prompts at once (continuous batching over the paged engine); one
        `Generation` per prompt, in order, the tokens `generate` gives for it. Greedy unless
        `sampler` (its settings and seed for every prompt) or `params` (one `SamplingParams` for
        every prompt, with `max_new_tokens`; or one per prompt, their own max_new_tokens) is given."""
        from rlx.frontends.paged import DEFAULT_PAGE_SIZE
        from rlx.runtime.batch import generate_batch, pages_for_batch
        from rlx.runtime.sampling import params_from_sampler

        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        news = [max_new_tokens] * len(ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(news) != len(ids):
            raise RlxError(f"{len(ids)} prompts but {len(news)} max_new_tokens values",
                           hint="give one int, or one per prompt")
        if params is None:
            settings = [params_from_sampler(sampler, n) for n in news]
        else:
            settings = list(params) if isinstance(params, Sequence) else \
                [dataclasses.replace(params, max_new_tokens=n) for n in news]
        paged = self.paged_model(num_pages=pages_for_batch(ids, settings, page_size=DEFAULT_PAGE_SIZE,
                                                           max_batch=max_batch))
        return generate_batch(paged, ids, settings, eos_ids=self.eos_ids, max_batch=max_batch,
                              keep_logits=keep_logits)

    def pool_pages(self, *, max_batch: int = 8, num_pages: int | None = None, kv_memory_mb: float | None = None,
                   page_size: int | None = None) -> int:
        """The KV pool a scheduler gets: `num_pages`, else what `kv_memory_mb` MiB buys, else room
        for `max_batch` sequences of 2048 positions (`runtime.kv_pages.pool_size`)."""
        from rlx.runtime.kv_pages import pool_size

        if num_pages is not None and kv_memory_mb is None:
            return num_pages
        probe = self.paged_model(1, page_size)  # builds (or compiles) the step once; pools come later
        return pool_size(page_size=probe.page_size, max_seq=probe.max_seq, page_bytes=probe.page_bytes,
                         max_batch=max_batch, num_pages=num_pages, memory_mb=kv_memory_mb)

    def scheduler(self, *, num_pages: int | None = None, kv_memory_mb: float | None = None,
                  page_size: int | None = None, max_batch: int = 8, max_queue: int = 256,
                  max_tokens_per_step: int = 256, prefix_cache: bool = True) -> Scheduler:
        """A continuous-batching scheduler over this model's paged engine (`runtime/scheduler.py`),
        its pool sized by `pool_pages`."""
        from rlx.runtime.scheduler import Scheduler

        num_pages = self.pool_pages(max_batch=max_batch, num_pages=num_pages, kv_memory_mb=kv_memory_mb,
                                    page_size=page_size)
        return Scheduler(self.paged_model(num_pages=num_pages, page_size=page_size), max_batch=max_batch,
                         max_queue=max_queue, max_tokens_per_step=max_tokens_per_step, eos_ids=self.eos_ids,
                         prefix_cache=prefix_cache)

    def async_engine(self, **scheduler_options: int | bool | None) -> AsyncEngine:
        """A scheduler (options as `scheduler`) driven by a background thread for asyncio code
        (`runtime/async_engine.py`: `submit` / `generate` stream `TokenEvent`s; the server's engine)."""
        from rlx.runtime.async_engine import AsyncEngine

        return AsyncEngine(self.scheduler(**scheduler_options))  # type: ignore[arg-type]  # scheduler() checks each


def load(path: str | Path, target: str = "reference", *, profile: str | Path | Profile | None = None,
         passes: str | None = None, quantize: str | None = None, verify: bool = False) -> Model:
    """Open a checkpoint (HF directory or GGUF file) for generation on `target`, or an artifact.

    `profile` is a `Profile`, a preset name or a `gemma.rlx.toml` path (None: the one next to the
    weights, else the default); `passes` is pipeline text that replaces the profile's pipeline;
    `quantize` a scheme that replaces its [quantize] scheme. Profile and passes do not apply to an
    artifact (compiled already); `quantize` must then name the scheme it was compiled with.
    `verify` hashes an artifact's files in full.
    """
    if is_artifact(path):
        refuse_compile_options(path, {"profile": profile, "passes": passes})
        return _load_artifact(Path(path), target, verify, quantize)
    if target not in ENGINES:
        raise RlxError(f"unknown target {target!r} for run", hint=f"use one of: {', '.join(ENGINES)}")
    chosen = resolve_profile(profile, path, quantize)  # a bad profile fails before any weight is read
    ckpt = open_checkpoint(path)
    engine = ENGINES[target](ckpt, passes=passes, profile=chosen)

    def paged(num_pages: int, page_size: int | None) -> PagedEngine:
        return PAGED_ENGINES[target](ckpt, engine, num_pages=num_pages, page_size=page_size or DEFAULT_PAGE_SIZE,
                                     passes=passes, profile=chosen)

    return Model(engine, ckpt.config.eos_token_ids, lambda: Tokenizer.from_checkpoint(ckpt), chosen, paged_from=paged)


def refuse_compile_options(artifact: str | Path, options: Mapping[str, object]) -> None:
    """Options that shape a compile (profile, passes; named as the caller spells them) have no
    meaning for an artifact, compiled already: refuse any that is given."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise RlxError(f"{' and '.join(given)} shape a compile; {artifact} is an artifact, compiled already",
                       hint="drop them, or compile again with them: rlx compile CHECKPOINT "
                            + " ".join(f"{name} ..." for name in given))


def is_artifact(path: str | Path) -> bool:
    """A directory `rlx compile` wrote (it has a manifest; whether it is intact is checked on load)."""
    return (Path(path) / "manifest.json").is_file()


def _load_artifact(path: Path, target: str, verify: bool, quantize: str | None) -> Model:
    """A compiled artifact runs on the target it was compiled for, with the weights it was compiled
    with; `--target` / `--quantize` may only confirm them."""
    from rlx.runtime.artifact_engine import ArtifactEngine

    engine = ArtifactEngine(path, verify=verify)
    scheme = engine.manifest["quantize"]["scheme"]
    if quantize is not None and quantize != scheme:
        raise RlxError(f"{path} was compiled with --quantize {scheme}, not {quantize}",
                       hint=f"drop --quantize, or compile again: rlx compile CHECKPOINT --quantize {quantize}")
    if target not in ("reference", engine.name):  # "reference" is the flag's default: not a choice
        raise RlxError(f"{path} is compiled for {engine.name}, not {target}",
                       hint=f"drop --target, or compile for it: rlx compile CHECKPOINT --target {target}")
    detokenizer = (lambda: Detokenizer.load(path)) if (path / DETOKENIZER_FILE).is_file() else None
    return Model(engine, engine.config.eos_token_ids, lambda: Tokenizer.from_hf_dir(path),
                 detokenizer_from=detokenizer, paged_from=engine.paged_model)


def tokenizer_for(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint or artifact, without loading any weights (so a prompt can be
    encoded, and the tokenizer dropped, before the model takes its memory)."""
    if is_artifact(path):
        return Tokenizer.from_hf_dir(Path(path))
    return Tokenizer.from_checkpoint(open_checkpoint(path))


def compile(checkpoint: str | Path, target: str | list[str] = "cpu", out: str | Path | None = None, *,
            profile: str | None = None, passes: str | None = None, max_seq: int | None = None,
            quantize: str | None = None, progress: bool = False, serve: bool = True) -> list[Path]:
    """Compile a checkpoint to artifact directories (one per target); see `rlx compile`. Quiet
    unless `progress` (phase lines on stderr, as the CLI shows them); `serve=False` leaves out the
    batched step entries (`rlx compile --no-serve`)."""
    from rlx.compiler.compile import compile_checkpoint
    from rlx.progress import reporting

    targets = split_targets(target) if isinstance(target, str) else list(target)
    with reporting(progress):
        return compile_checkpoint(checkpoint, targets, out, profile=profile, passes=passes, max_seq=max_seq,
                                  quantize=quantize, serve=serve)
