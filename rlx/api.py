"""The public Python API: `rlx.load(checkpoint).generate(...)`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rlx.compiler.engines import ENGINES
from rlx.compiler.profile import Profile
from rlx.compiler.profile_toml import resolve_profile
from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.detokenizer import FILE as DETOKENIZER_FILE
from rlx.runtime.detokenizer import Detokenizer
from rlx.runtime.engine import Engine
from rlx.runtime.generate import Generation, generate
from rlx.runtime.sampler import Sampler
from rlx.runtime.tokenizer import Tokenizer


@dataclass
class Model:
    """A model ready to generate: an engine plus where its tokenizer comes from (loaded lazily,
    so `--prompt-ids` runs need none)."""

    engine: Engine
    eos_ids: tuple[int, ...]
    tokenizer_from: Callable[[], Tokenizer]
    profile: Profile | None = None
    detokenizer_from: Callable[[], Detokenizer] | None = None  # a decode-only table, when there is one
    _tokenizer: Tokenizer | None = None
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
    return Model(engine, ckpt.config.eos_token_ids, lambda: Tokenizer.from_checkpoint(ckpt), chosen)


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
                 detokenizer_from=detokenizer)


def tokenizer_for(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint or artifact, without loading any weights (so a prompt can be
    encoded, and the tokenizer dropped, before the model takes its memory)."""
    if is_artifact(path):
        return Tokenizer.from_hf_dir(Path(path))
    return Tokenizer.from_checkpoint(open_checkpoint(path))


def compile(checkpoint: str | Path, target: str | list[str] = "cpu", out: str | Path | None = None, *,
            profile: str | None = None, passes: str | None = None, max_seq: int | None = None,
            quantize: str | None = None) -> list[Path]:
    """Compile a checkpoint to artifact directories (one per target); see `rlx compile`."""
    from rlx.compiler.compile import compile_checkpoint

    targets = target.split(",") if isinstance(target, str) else list(target)
    return compile_checkpoint(checkpoint, targets, out, profile=profile, passes=passes, max_seq=max_seq,
                              quantize=quantize)
