"""Generated ids -> text as it streams: incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-fallback pieces (a multi-byte character split over
several tokens decodes to U+FFFD until its last byte arrives) and for decoders that strip a leading
space; so each new token is decoded in a short window after the text already sent, and text is
released only once it no longer ends in an incomplete character (the windowed scheme of HF's
text-generation-inference). The concatenation of the deltas is the decode of all ids.

Stop strings may span token boundaries and are never emitted: text that could still be the start
of a stop string is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_INCOMPLETE = "\ufffd"


@dataclass
class IncrementalDecoder:
    """`push(token)` returns the text that token completes (possibly ""); `flush()` the rest."""

    decode: Callable[[list[int]], str]
    ids: list[int] = field(default_factory=list)
    _prefix: int = 0   # start of the decode window
    _read: int = 0     # ids before this are already sent

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        sent = self.decode(self.ids[self._prefix:self._read])
        text = self.decode(self.ids[self._prefix:])
        if len(text) > len(sent) and not text.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(sent):]
        return ""

    def flush(self) -> str:
        """What is left (an incomplete character at the very end decodes as U+FFFD, as a full
        decode would)."""
        sent = self.decode(self.ids[self._prefix:self._read])
        text = self.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(sent):]


@dataclass
class StopStrings:
    """Cuts text at the first stop string; `push` returns (text safe to emit, stopped)."""

    stops: Sequence[str]
    _pending: str = ""
    stopped: bool = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return buf[:min(hits)], True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1))
                    if buf.endswith(s[:k])), default=0)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return "" if self.stopped else out


class TextStream:
    """One choice's text: tokens in, (delta, stopped by a stop string) out."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self._decoder = IncrementalDecoder(decode)
        self._stops = StopStrings(list(stops))
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        delta, stopped = self._stops.push(self._decoder.push(token))
        self.text += delta
        return delta, stopped

    def finish(self) -> str:
        """The text held back at the end of generation (none after a stop string)."""
        if self._stops.stopped:
            return ""
        delta, stopped = self._stops.push(self._decoder.flush())
        delta += "" if stopped else self._stops.flush()
        self.text += delta
        return delta

    @property
    def stopped(self) -> bool:
        return self._stops.stopped
