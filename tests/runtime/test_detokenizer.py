"""The decode-only table decodes exactly as HF `tokenizers` does (the reference here), on the real
Gemma 3 vocabulary and on a decoder with every step kind it mirrors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as Backend

from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.detokenizer import Detokenizer
from rlx.runtime.tokenizer import Tokenizer


def _cases(backend: Backend, rng: np.random.Generator) -> list[list[int]]:
    """Random ids, byte-token runs (valid and invalid UTF-8), specials, and the empty list."""
    vocab = backend.get_vocab_size(with_added_tokens=True)
    byte = {int(t[3:5], 16): i for t, i in backend.get_vocab().items() if len(t) == 6 and t.startswith("<0x")}
    euro = [byte[b] for b in "€".encode()]
    cases = [list(map(int, rng.integers(0, vocab, size=n))) for n in (1, 2, 7, 40) for _ in range(25)]
    cases += [euro, euro[:2], [euro[0], 5, euro[1]], [byte[0xFF], byte[0x41]], []]
    return cases


@pytest.fixture(scope="module")
def gemma3(real_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_checkpoint(open_checkpoint(real_gguf_path))


def test_real_gemma3_vocabulary(gemma3: Tokenizer, tmp_path: Path) -> None:
    gemma3.save(tmp_path)  # what rlx compile puts in an artifact
    detok = Detokenizer.load(tmp_path)
    assert len(detok.pieces) == gemma3.vocab_size and detok.special
    # pieces + decoder steps only (tokenizer.json also holds the merges, stored compactly)
    assert (tmp_path / "detokenizer.json").stat().st_size < (tmp_path / "tokenizer.json").stat().st_size / 3
    rng = np.random.default_rng(0)
    specials = sorted(detok.special)[:3]
    for ids in [*_cases(gemma3.backend, rng), [*specials, 818, *specials]]:
        for skip in (False, True):
            assert detok.decode(ids, skip_special=skip) == gemma3.decode(ids, skip_special=skip), (ids, skip)


def test_every_step_kind_against_tokenizers() -> None:
    pieces = ["<unk>", "<s>", "\u2581", "\u2581\u2581hi", "there\u2581", "a", "aab", "baa", "aaaa", "bb",
              *[f"<0x{b:02X}>" for b in range(256)]]
    backend = Backend(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>",
                                 byte_fallback=True))
    backend.add_special_tokens([AddedToken("<s>", special=True)])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    detok = Detokenizer.from_tokenizer(backend)
    for ids in _cases(backend, np.random.default_rng(1)):
        for skip in (False, True):
            assert detok.decode(ids, skip_special=skip) == backend.decode(ids, skip_special_tokens=skip), ids
    backend.decoder = decoders.Strip("a", 2, 2)  # per token (no Fuse); tokenizers panics on tokens < stop
    detok = Detokenizer.from_tokenizer(backend)
    for ids in ([6, 7, 8, 9], [8], [7, 6], [9, 9, 8]):
        assert detok.decode(ids) == backend.decode(ids), ids


def test_unknown_decoder_step_is_refused() -> None:
    backend = Backend(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.WordPiece()
    with pytest.raises(RlxError, match="WordPiece"):
        Detokenizer.from_tokenizer(backend)


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "detokenizer.json").write_text("{not json")
    with pytest.raises(RlxError, match="detokenizer.json"):
        Detokenizer.load(tmp_path)
