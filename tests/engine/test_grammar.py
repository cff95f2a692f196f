"""engine.grammar: llguidance masks over SmolLM2's vocabulary, and constrained sampling with them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.errors import DllamaError
from engine.grammar import GrammarMask, check_grammar, json_grammar
from engine.sampler import Sampler
from engine.tokenizer import Tokenizer, load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok(smollm2_path) -> Tokenizer:
    return load_tokenizer(smollm2_path)


def test_valid_text_walks_through_and_ends_with_eos_only(tok):
    mask = GrammarMask(json_grammar(SCHEMA), tok)
    ids = tok.encode(json.dumps({"name": "Ann", "n": 42}), bos=False)
    for t in ids:
        allowed = np.isfinite(mask(np.zeros(tok.vocab_size, np.float32)))
        assert allowed[t], tok.token_text(t)
        assert 0 < allowed.sum() < tok.vocab_size
        mask.accept(t)
    allowed = np.flatnonzero(np.isfinite(mask(np.zeros(tok.vocab_size, np.float32))))
    assert set(allowed) <= set(tok.eos_ids) and len(allowed) > 0


def test_mask_forbids_what_the_schema_forbids(tok):
    mask = GrammarMask(json_grammar(SCHEMA), tok)
    for t in tok.encode('{"name": "', bos=False):
        mask.accept(t)
    allowed = np.isfinite(mask(np.zeros(tok.vocab_size, np.float32)))
    pieces = [tok.token_text(i) for i in np.flatnonzero(allowed)]
    assert max(len(p.rstrip('"')) for p in pieces) <= 8  # maxLength 8 (characters) bounds every piece
    assert any(len(tok.token_text(i)) > 9 and tok.token_text(i).isalpha() for i in range(tok.vocab_size))
    for t in tok.encode('Ann", ', bos=False):
        mask.accept(t)
    close = tok.encode("}", bos=False)[0]
    assert not np.isfinite(mask(np.zeros(tok.vocab_size, np.float32)))[close]  # "n" is required
    with pytest.raises(DllamaError, match="constrained decoding failed"):
        mask.accept(close)


def test_sampler_draws_only_allowed_tokens(tok):
    """Random logits that favour a forbidden token: every draw still follows the grammar to a valid end."""
    rng = np.random.default_rng(5)
    mask = GrammarMask(json_grammar(SCHEMA), tok)
    sampler = Sampler(tok.vocab_size, temperature=1.0, topp=0.95, seed=3, grammar=mask)
    out: list[int] = []
    while len(out) < 200:
        logits = rng.normal(0, 1, tok.vocab_size).astype(np.float32)
        logits[tok.encode("x", bos=False)[0]] = 50.0
        t = sampler.sample(logits)
        if t in tok.eos_ids:
            break
        out.append(t)
    value = json.loads(tok.decode(out))
    assert set(value) == {"name", "n"} and len(value["name"]) <= 8 and isinstance(value["n"], int)


def test_invalid_schema_is_refused(tok):
    with pytest.raises(DllamaError, match="not a usable JSON schema"):
        check_grammar(json_grammar({"type": "no-such-type"}), tok)
    check_grammar(json_grammar(None), tok)
