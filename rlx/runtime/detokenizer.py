"""Ids -> text without the tokenizer: the piece table plus the tokenizer's decoder steps.

Decoding needs none of what makes a Gemma tokenizer big (514k BPE merges, the normalizer and
pre-tokenizer): HF `tokenizers` holds about 350 MB for Gemma 3's tokenizer.json, which `rlx run`
would otherwise keep resident next to the weights for the whole generation only to print text.
`rlx compile` writes `detokenizer.json` (every token's piece, the decoder steps; ~4 MB) into the
artifact; this module applies it exactly the way `tokenizers` decodes (each step below mirrors its
Rust decoder of that name; `tests/runtime/test_detokenizer.py` checks equality on the real
vocabulary). A decoder step it does not know makes `from_tokenizer` refuse, so the artifact keeps
only the full tokenizer and nothing decodes differently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlx.errors import RlxError

_NO_DETOK = "this tokenizer's decoder is not covered: the artifact keeps tokenizer.json, which prints the text"

FILE = "detokenizer.json"
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _replace(tokens: list[str], step: dict[str, Any]) -> list[str]:
    pattern, content = step["pattern"], step["content"]
    if "String" not in pattern:
        raise RlxError(f"decoder Replace with a regex pattern {pattern!r} is not supported", hint=_NO_DETOK)
    return [t.replace(pattern["String"], content) for t in tokens]


def _byte_fallback(tokens: list[str], step: dict[str, Any]) -> list[str]:
    """Runs of <0xNN> tokens become their UTF-8 text, or one U+FFFD per byte if invalid."""
    out: list[str] = []
    run = bytearray()

    def flush() -> None:
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run.clear()

    for t in tokens:
        m = _BYTE.fullmatch(t) if len(t) == 6 else None
        if m:
            run.append(int(m.group(1), 16))
        else:
            flush()
            out.append(t)
    flush()
    return out


def _fuse(tokens: list[str], step: dict[str, Any]) -> list[str]:
    return ["".join(tokens)]


def _strip(tokens: list[str], step: dict[str, Any]) -> list[str]:
    """Up to `start` leading and `stop` trailing `content` characters off each token."""
    content, start, stop = step["content"], step["start"], step["stop"]

    def one(t: str) -> str:
        lead = next((i for i, c in enumerate(t[:start]) if c != content), min(start, len(t)))
        tail = next((i for i, c in enumerate(reversed(t[lead:])) if i >= stop or c != content),
                    min(stop, len(t) - lead))
        return t[lead:len(t) - tail]

    return [one(t) for t in tokens]


# `tokenizers` decoder type -> its effect on the token list
STEPS: dict[str, Callable[[list[str], dict[str, Any]], list[str]]] = {
    "Replace": _replace, "ByteFallback": _byte_fallback, "Fuse": _fuse, "Strip": _strip,
}


def _flatten(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if decoder is None:
        raise RlxError("the tokenizer has no decoder", hint=_NO_DETOK)
    if decoder["type"] == "Sequence":
        return [s for d in decoder["decoders"] for s in _flatten(d)]
    if decoder["type"] not in STEPS:
        raise RlxError(f"decoder step {decoder['type']!r} is not supported by the detokenizer", hint=_NO_DETOK)
    return [decoder]


class Pieces(Sequence[str]):
    """Every token's piece as one UTF-8 blob plus offsets: ~4 MB for Gemma 3's 262k pieces, where
    a list of Python strings holds ~33 MB next to the weights for the whole generation."""

    def __init__(self, pieces: Sequence[str]) -> None:
        encoded = [p.encode("utf-8") for p in pieces]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]  # ints only: no slices of pieces
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start:int(self._ends[i])].decode("utf-8")


class Detokenizer:
    def __init__(self, pieces: Sequence[str], steps: Sequence[dict[str, Any]], special: Sequence[int]) -> None:
        self.pieces = Pieces(pieces)
        self.steps = list(steps)
        self.special = frozenset(special)

    @classmethod
    def from_tokenizer(cls, backend: Any) -> Detokenizer:
        """From a `tokenizers.Tokenizer`; raises RlxError when its decoder has an unknown step."""
        spec = json.loads(backend.to_str())
        steps = _flatten(spec.get("decoder"))
        pieces = [backend.id_to_token(i) or "" for i in range(backend.get_vocab_size(with_added_tokens=True))]
        special = [t["id"] for t in spec.get("added_tokens", []) if t.get("special")]
        return cls(pieces, steps, special)

    def save(self, directory: Path) -> None:
        blob = {"pieces": list(self.pieces), "steps": self.steps, "special": sorted(self.special)}
        (Path(directory) / FILE).write_text(json.dumps(blob, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> Detokenizer:
        path = Path(directory) / FILE
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            return cls(blob["pieces"], blob["steps"], blob["special"])
        except (OSError, ValueError, KeyError) as err:
            raise RlxError(f"{path} cannot be read ({err})", hint="compile the artifact again") from err

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        tokens = [self.pieces[int(i)] for i in ids if not (skip_special and int(i) in self.special)]
        for step in self.steps:
            tokens = STEPS[step["type"]](tokens, step)
        return "".join(tokens)
