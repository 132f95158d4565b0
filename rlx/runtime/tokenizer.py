"""Text <-> token ids for a checkpoint, via the `tokenizers` library.

An HF directory brings its tokenizer.json. A GGUF brings only llama.cpp's `tokenizer.ggml.*`
arrays; from them we rebuild the same `tokenizers.Tokenizer` transformers builds
(`integrations/gguf/gguf_tokenizer_mapping.py` + `GemmaTokenizer`, v5.24): SentencePiece-style
BPE with byte fallback, merges recovered from the vocabulary order, control tokens special.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from rlx.errors import RlxError
from rlx.frontends.checkpoint import Checkpoint
from rlx.runtime.detokenizer import Detokenizer

_SPACE = "\u2581"  # SentencePiece's visible space
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_NO_TOKENIZER_HINT = "pass token ids with --prompt-ids, or put the model's tokenizer.json next to its weights"


def _generate_merges(vocab: Mapping[str, int], scores: Mapping[str, float] | None) -> list[tuple[str, str]]:
    """transformers' `generate_merges`: every split of every token into two vocabulary pieces,
    best score first (or in vocabulary order without scores), ties broken identically."""
    reverse = scores is not None
    ranked = dict(scores) if scores is not None else vocab
    merges: list[tuple[str, str, float]] = []
    for token, score in ranked.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=reverse)
    return [(left, right) for left, right, _ in merges]


def _gemma_spm(tokens: list[str], meta: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """Gemma 1-3 files: whitespace-only tokens are stored as real spaces and no merges are stored;
    Gemma's merge order is the order of the vocabulary, not its scores."""
    spelled = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    return spelled, _generate_merges(vocab, {t: -i for i, t in enumerate(spelled)})


def _gemma4_spm(tokens: list[str], meta: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """Gemma 4 files spell tokens as-is and usually store merges; otherwise scores rank them."""
    stored = meta.get("tokenizer.ggml.merges")
    if stored is not None:
        return tokens, [tuple(m.split(" ", 1)) for m in stored]
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = meta.get("tokenizer.ggml.scores")
    return tokens, _generate_merges(vocab, dict(zip(tokens, scores, strict=True)) if scores else None)


# tokenizer.ggml.model -> vocabulary/merges builder
_GGUF_BUILDERS: dict[str, Callable[[list[str], Mapping[str, Any]], tuple[list[str], list[tuple[str, str]]]]] = {
    "llama": _gemma_spm,
    "gemma4": _gemma4_spm,
}


def _gguf_backend(meta: Mapping[str, Any], source: str) -> Backend:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise RlxError(f"{source} has no tokenizer (no tokenizer.ggml.tokens)", hint=_NO_TOKENIZER_HINT)
    kind = meta.get("tokenizer.ggml.model")
    builder = _GGUF_BUILDERS.get(kind)  # type: ignore[arg-type]  # any metadata value: not a key -> None
    if builder is None:
        raise RlxError(f"{source}: GGUF tokenizer model {kind!r} is not a Gemma tokenizer",
                       hint=f"supported: {', '.join(_GGUF_BUILDERS)}; or {_NO_TOKENIZER_HINT}")
    spelled, merges = builder(list(tokens), meta)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else "<unk>"
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, dropout=None,
                                 fuse_unk=True, unk_token=unk, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", _SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    named = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("padding", "eos", "bos", "unknown")]
    vocab = backend.get_vocab()
    special = {tokens[i] for i in named if i is not None} | {"<mask>"} & set(vocab)
    special |= {t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL}
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in sorted(special)])
    # llama.cpp matches user-defined tokens ("\n\n", "<div>") whole: so must we
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return backend


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise RlxError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})", hint="re-download it") from err


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _compact_merges(spec_json: str) -> str:
    """A BPE tokenizer.json with its merges as "left right" strings instead of [left, right]
    pairs, when no piece holds a space (then both forms mean the same merges). `tokenizers`
    parses the string form in half the memory: for Gemma 3's 514k merges, 185 MB at peak and
    148 MB held instead of 380 / 314 MB, which is most of what `rlx run` peaks at before its
    weights load."""
    spec = json.loads(spec_json)
    merges = (spec.get("model") or {}).get("merges")
    if not merges or not all(isinstance(m, list) and len(m) == 2 for m in merges) \
            or any(" " in part for m in merges for part in m):
        return spec_json
    spec["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(spec, ensure_ascii=False)


def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """tokenizer_config.json's `chat_template` (a string, or named templates: the "default" one),
    else transformers' separate chat_template.jinja."""
    value = config.get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(value, str) and value:
        return value
    path = directory / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


class Tokenizer:
    """Encodes prompts and decodes generated ids the way the model's own tokenizer does."""

    def __init__(self, backend: Backend, *, bos_id: int | None, eos_ids: Sequence[int], source: str,
                 chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))
        self.source = source
        self.chat_template = chat_template  # the model's jinja chat template, if it ships one (rlx serve / chat)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Tokenizer:
        meta = ckpt.weights.gguf_metadata
        if meta is not None:
            backend = _gguf_backend(meta, str(ckpt.path))
            return cls(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id", ckpt.config.bos_token_id),
                       eos_ids=ckpt.config.eos_token_ids, source=str(ckpt.path),
                       chat_template=meta.get("tokenizer.chat_template"))
        return cls.from_hf_dir(ckpt.directory, eos_ids=ckpt.config.eos_token_ids, bos_id=ckpt.config.bos_token_id)

    @classmethod
    def from_hf_dir(cls, directory: Path, *, eos_ids: Sequence[int] = (), bos_id: int | None = None) -> Tokenizer:
        """tokenizer.json, with BOS from tokenizer_config.json and extra EOS ids from generation_config.json."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise RlxError(f"no tokenizer.json in {directory}", hint=_NO_TOKENIZER_HINT)
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise RlxError(f"{path} cannot be loaded: {err}", hint="re-download the tokenizer") from err
        config = _json(Path(directory) / "tokenizer_config.json")
        bos_text = _token_text(config.get("bos_token"))
        if bos_text is not None and backend.token_to_id(bos_text) is not None:
            bos_id = backend.token_to_id(bos_text)
        generation_eos = _json(Path(directory) / "generation_config.json").get("eos_token_id")
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        return cls(backend, bos_id=bos_id, eos_ids=[*eos_ids, *(e for e in extra if e is not None)],
                   source=str(path), chat_template=_chat_template(Path(directory), config))

    def detokenizer(self) -> Detokenizer:
        """The decode-only table (raises RlxError if the decoder has a step it cannot mirror)."""
        return Detokenizer.from_tokenizer(self.backend)

    def save(self, directory: Path) -> None:
        """Write what `from_hf_dir` reads back: tokenizer.json, the BOS token, the EOS ids; and
        the decode-only `detokenizer.json` when the decoder allows one."""
        directory = Path(directory)
        (directory / "tokenizer.json").write_text(_compact_merges(self.backend.to_str()), encoding="utf-8")
        try:
            self.detokenizer().save(directory)
        except RlxError:
            pass  # decoding then loads the full tokenizer
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else None
        config = {"bos_token": bos, **({"chat_template": self.chat_template} if self.chat_template else {})}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_ids)}))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; with `add_bos`, the BOS id first (as transformers' default encode)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else list(ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; special tokens (<bos>, <eos>) are kept unless `skip_special`, as in transformers."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"


__all__ = ["Tokenizer"]
