"""Our tokenizer gives transformers' ids: the real gemma-3-270m GGUF, its saved tokenizer.json, a tiny GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.tokenizer import Tokenizer
from tests.fixtures.gguf_writer import write_gguf_from_hf

TEXTS = [
    "The capital of France is",
    "  leading and  double spaces ",
    "line one\nline two\n\n\nthree\ttab",
    "naïve café, Straße, 日本語のテキスト, Ελληνικά",
    "emoji 🙂👍🏽 and rare \u0378 codepoint",
    "<start_of_turn>user\nhi<end_of_turn>",
    "",
]


@pytest.fixture(scope="module")
def real(real_gguf_path: Path) -> tuple[Tokenizer, object]:
    ours = Tokenizer.from_checkpoint(open_checkpoint(real_gguf_path))
    theirs = transformers.AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_real_gguf_ids_match_transformers(real: tuple, text: str) -> None:
    ours, theirs = real
    ids = theirs(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.encode(text, add_bos=False) == ids[1:]
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True)


def test_real_gguf_special_ids(real: tuple) -> None:
    ours, _ = real
    assert ours.bos_id == 2 and ours.eos_ids == (1,) and ours.vocab_size == 262144


def test_saved_tokenizer_json_matches(real: tuple, tmp_path: Path) -> None:
    ours, theirs = real
    theirs.save_pretrained(tmp_path)
    from_json = Tokenizer.from_hf_dir(tmp_path, eos_ids=(1,))
    assert from_json.bos_id == 2
    for text in TEXTS:
        assert from_json.encode(text) == ours.encode(text)


def test_artifact_tokenizer_stores_merges_compactly_and_encodes_the_same(real: tuple, tmp_path: Path) -> None:
    """`Tokenizer.save` (what an artifact carries) writes BPE merges as "a b" strings, which
    `tokenizers` parses in half the memory; the merges, and so every encoding, stay the same."""
    import json

    ours, theirs = real
    ours.save(tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    assert [m.split(" ") for m in merges] == json.loads(ours.backend.to_str())["model"]["merges"]
    saved = Tokenizer.from_hf_dir(tmp_path)
    for text in [*TEXTS, " ".join(TEXTS) * 3]:
        assert saved.encode(text) == ours.encode(text) == theirs(text)["input_ids"]


@pytest.mark.parametrize(("family", "arch"), [("gemma3", "gemma3"), ("gemma4", "gemma4")])
def test_tiny_gguf_matches_transformers(family: str, arch: str, tiny_ckpt, tmp_path: Path) -> None:
    """Gemma 1-3 files ("llama" SentencePiece vocab) and Gemma 4 files ("gemma4", no respelling).

    transformers' GGUF *config* loader rejects Gemma 4's per-layer head_count_kv, so its tokenizer
    is built with the same functions AutoTokenizer uses, without the model config.
    """
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    path = write_gguf_from_hf(tiny_ckpt(family), tmp_path / "tiny.gguf", arch=arch)
    ours = Tokenizer.from_checkpoint(open_checkpoint(path))
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    theirs, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    for text in ["hello world", "  the  world\n\nHW!", "héllo", "<eos>x", " hello"]:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_bos=False) == ids, text
        assert ours.encode(text) == [2, *ids]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False)


def test_missing_tokenizer_suggests_prompt_ids(tiny_ckpt) -> None:
    with pytest.raises(RlxError, match="no tokenizer.json") as info:
        Tokenizer.from_checkpoint(open_checkpoint(tiny_ckpt("gemma2")))
    assert "--prompt-ids" in str(info.value)
