"""Sampled token ids to the text pieces a caller streams: never half a UTF-8 character, never part of a stop
string (a piece that could be the start of one is held back until the next token tells)."""

from __future__ import annotations

import codecs
from typing import Callable, Iterable, Iterator, Sequence


class TextPieces:
    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()) -> None:
        self._token_bytes, self._stop = token_bytes, tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False                      # a stop string was reached: nothing more is given

    def push(self, token: int) -> str:
        """The text that can be shown after `token` (often empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._token_bytes(token))
        hit = min((self._pending.find(s) for s in self._stop if s in self._pending), default=-1)
        if hit >= 0:
            self.stopped = True
            shown, self._pending = self._pending[:hit], ""
            return shown
        safe = len(self._pending) - stop_prefix_length(self._pending, self._stop)
        shown, self._pending = self._pending[:safe], self._pending[safe:]
        return shown

    def finish(self) -> str:
        """What was held back, once the answer has ended without reaching a stop string."""
        if self.stopped:
            return ""
        shown, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return shown


def text_of(tokens: Iterable[int], token_bytes: Callable[[int], bytes], stop: Sequence[str] = (),
            on_token: Callable[[int], None] | None = None) -> Iterator[str]:
    """The pieces of an answer's text as its ids come, up to the first stop string; `on_token` sees each id."""
    pieces = TextPieces(token_bytes, stop)
    for token in tokens:
        if on_token:
            on_token(token)
        piece = pieces.push(token)
        if piece:
            yield piece
        if pieces.stopped:
            return
    rest = pieces.finish()
    if rest:
        yield rest


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string (held back)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
