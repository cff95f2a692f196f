"""Stop strings applied to streamed text: nothing from a stop string on is ever emitted, even when a stop
string arrives split over several pieces.

Generation stops at the first character where some stop string is complete, and the text is cut where that
stop string begins (the longest one when several end there), so the result does not depend on how the text
was cut into tokens."""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """Holds back the shortest tail of the text that could still begin a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit, whether a stop string was hit). After a hit the text before
        the stop string is returned and everything from it on is dropped."""
        text = self.held + piece
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)[1]], True
        keep = self._open_tail(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """End of generation without a stop string: the held-back tail is ordinary text after all."""
        text, self.held = self.held, ""
        return text

    def _open_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
