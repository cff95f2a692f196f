"""StopFilter: whatever way the text is cut into pieces, the emitted text is exactly the text before the
first stop string to be complete (or all of it), and a stop string is never emitted, even partly."""

from __future__ import annotations

import random

from engine.server.stops import StopFilter


def _expected(text: str, stops: list[str]) -> tuple[str, bool]:
    """Character by character: at the first end of a stop string, cut where the longest one ending there
    starts."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def _run(pieces: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    f = StopFilter(stops)
    out, emitted = "", []
    for p in pieces:
        text, hit = f.push(p)
        emitted.append(text)
        out += text
        if hit:
            return out, True, emitted
    tail = f.flush()
    return out + tail, False, emitted


def test_examples_by_hand():
    assert _run(["The capital", " of", " France"], [" of Fr"])[:2] == ("The capital", True)
    assert _run(["Hello <|", "im", "_end|> tail"], ["<|im_end|>"])[:2] == ("Hello ", True)
    assert _run(["a<", "b"], ["<|"])[:2] == ("a<b", False)  # held back "<" is released when it is no stop
    assert _run(["abc"], [])[:2] == ("abc", False)
    assert _run(["xxSTOPyySTOP"], ["yy", "STOP"])[:2] == ("xx", True)  # the first stop to complete wins
    assert _run(["  ba\n"], ["a", "ba\n"])[:2] == ("  b", True)  # "a" is complete before "ba\n"
    for pieces in (["xab"], ["xa", "b"], ["x", "a", "b"]):  # both end at "b": the longer one is cut
        assert _run(pieces, ["ab", "xab"])[:2] == ("", True)


def test_random_splits_match_reference():
    rng = random.Random(5)
    alphabet = "ab c\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))
        ]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, hit, emitted = _run(pieces, stops)
        assert (out, hit) == _expected(text, stops), (text, stops, pieces)
        for k in range(len(emitted)):  # nothing emitted so far ever holds a stop string
            assert not any(s in "".join(emitted[: k + 1]) for s in stops)
