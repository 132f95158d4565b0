"""Streaming text: the deltas of the incremental decoder add up to the decode of all ids (byte-fallback
characters split over tokens, a decoder that strips the first space); stop strings across token
boundaries are cut and never emitted, whatever the split."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models

from rlx.serve.text import IncrementalDecoder, StopStrings, TextStream

PIECES = ["<unk>", "\u2581the", "\u2581caf", "\u00e9", "\u2581", "ab", "c", "END", "EN", "D"]


def _byte_fallback_tokenizer(strip: bool) -> Tokenizer:
    vocab = {p: i for i, p in enumerate(PIECES)}
    vocab.update({f"<0x{b:02X}>": len(PIECES) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip else []))
    return tok


def _byte_ids(text: str) -> list[int]:
    return [len(PIECES) + b for b in text.encode("utf-8")]


@pytest.mark.parametrize("strip", [False, True])
def test_incremental_decode_equals_full_decode(strip: bool) -> None:
    tok = _byte_fallback_tokenizer(strip)
    rng = random.Random(0)
    atoms = [[1], [2], [3], [4], [5], [6], _byte_ids("日本"), _byte_ids("🙂"), _byte_ids("é")]
    for _ in range(200):
        ids = [i for _ in range(rng.randint(1, 12)) for i in rng.choice(atoms)]
        decoder = IncrementalDecoder(lambda xs: tok.decode(xs))
        deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(deltas) == tok.decode(ids), ids
        assert all("\ufffd" not in d for d in deltas)


def test_an_invalid_byte_spoils_only_itself() -> None:
    """Where the stream differs from a full decode, on purpose: `tokenizers` turns a whole run of
    byte tokens into U+FFFDs when any byte of it is invalid; streamed, the complete characters
    before the bad byte were sent already, and stay."""
    tok = _byte_fallback_tokenizer(False)
    ids = [*_byte_ids("é"), len(PIECES) + 0xE6, 5]
    decoder = IncrementalDecoder(lambda xs: tok.decode(xs))
    streamed = "".join([decoder.push(i) for i in ids] + [decoder.flush()])
    assert streamed.startswith("é\ufffd") and streamed.endswith("ab")
    assert tok.decode(ids) == "\ufffd\ufffd\ufffdab"


def test_a_split_character_waits_for_its_last_byte() -> None:
    tok = _byte_fallback_tokenizer(False)
    decoder = IncrementalDecoder(lambda xs: tok.decode(xs))
    out = [decoder.push(i) for i in [1, *_byte_ids("🙂")]]
    assert out == [" the", "", "", "", "🙂"]


@pytest.mark.parametrize("seed", range(30))
def test_stop_strings_across_any_split(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(["ab", "E", "N", "D", "x", "EN", "DE", " ", "STOP"]) for _ in range(rng.randint(1, 20)))
    stops = rng.sample(["END", "STOP", "NDE", "xx"], rng.randint(1, 3))
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopStrings(stops)
    emitted, stopped = "", False
    for piece in pieces:
        out, stopped = matcher.push(piece)
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    assert stopped == (first is not None)
    assert emitted == (text if first is None else text[:first])


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    matcher = StopStrings(["END"])
    assert matcher.push("abcE") == ("abc", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("x") == ("ENx", False)
    assert matcher.push("EN") == ("", False)
    assert matcher.flush() == "EN"


def test_text_stream_stops_on_a_string_split_over_tokens() -> None:
    tok = _byte_fallback_tokenizer(False)
    stream = TextStream(lambda xs: tok.decode(xs), stops=["END"])
    results = [stream.push(i) for i in [5, 6, 8, 9, 5]]  # "ab" "c" "EN" "D" "ab"
    assert [r[0] for r in results[:4]] == ["ab", "c", "", ""] and results[3][1]
    assert stream.text == "abc" and stream.finish() == ""
