"""Penalties, logit_bias and logprobs through the official `openai` client against a live dllama-api, each
checked against a greedy loop over the embedded model's own forward passes (float64, written out here)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw_logits(reference, ids: list[int], continuation: list[int]) -> list[np.ndarray]:
    """The model's float64 logits (tokenizer vocabulary) before each token of `continuation` and after it."""
    runner, vocab = reference.loaded.runner, reference.tokenizer.vocab_size
    out = [runner.forward(ids, 0, "last")[:vocab].astype(np.float64)]
    for i, token in enumerate(continuation):
        out.append(runner.forward([token], len(ids) + i, "last")[:vocab].astype(np.float64))
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def penalised_greedy(reference, ids, steps, presence=0.0, frequency=0.0, repetition=1.0) -> list[int]:
    """Greedy decoding with the penalties applied in float64 to every id, as the rules state them."""
    runner, tok = reference.loaded.runner, reference.tokenizer
    logits = runner.forward(ids, 0, "last")
    generated: list[int] = []
    for step in range(steps):
        x = logits[: tok.vocab_size].astype(np.float64)
        seen = np.array(sorted(set(ids) | set(generated)), np.int64)
        x[seen] = np.where(x[seen] > 0, x[seen] / repetition, x[seen] * repetition)
        for token, count in Counter(generated).items():
            x[token] -= count * frequency + presence
        token = int(np.argmax(x))
        generated.append(token)
        if token in tok.eos_ids:
            break
        logits = runner.forward([token], len(ids) + step, "last")
    return generated


def reply_text(reference, tokens: list[int]) -> str:
    """The reply's text as the server streams it (EOS dropped)."""
    tok = reference.tokenizer
    return tok.decode([t for t in tokens if t not in tok.eos_ids])


def test_logit_bias_minus_100_gives_the_runner_up(client, reference):
    ids = reference.chat_ids(QUESTION)
    x = raw_logits(reference, ids, [])[0]
    first, second = (int(i) for i in np.argsort(-x, kind="stable")[:2])
    r = client.chat.completions.create(
        model="m",
        messages=QUESTION,
        temperature=0,
        max_tokens=1,
        logprobs=True,
        logit_bias={str(first): -100},
    )
    assert r.choices[0].logprobs.content[0].bytes == list(reference.tokenizer.token_bytes(second))
    assert r.choices[0].message.content == reply_text(reference, [second])
    plain = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=1)
    assert plain.choices[0].message.content == reply_text(reference, [first])


def test_logit_bias_plus_100_forces_a_token(client, reference):
    forced = reference.tokenizer.encode(" banana", bos=False)[0]
    r = client.completions.create(
        model="m", prompt="The sky is", temperature=0, max_tokens=3, logit_bias={str(forced): 100}
    )
    assert r.choices[0].text == reference.tokenizer.decode([forced] * 3)


@pytest.mark.parametrize(
    "penalty",
    [
        {"presence_penalty": 2.0},
        {"presence_penalty": -2.0},
        {"frequency_penalty": 1.5},
        {"repetition_penalty": 1.8},
    ],
    ids=["presence", "negative-presence", "frequency", "repetition"],
)
def test_penalties_follow_the_rule(client, reference, penalty):
    ids = reference.chat_ids(POEM)
    names = {
        "presence_penalty": "presence",
        "frequency_penalty": "frequency",
        "repetition_penalty": "repetition",
    }
    kwargs = {names[k]: v for k, v in penalty.items()}
    want = penalised_greedy(reference, ids, 16, **kwargs)
    assert want != penalised_greedy(reference, ids, 16)  # the penalty changes this reply
    # repetition_penalty is vLLM's, not OpenAI's: the client sends it as an extra field
    sent = {"extra_body": penalty} if "repetition_penalty" in penalty else penalty
    r = client.chat.completions.create(model="m", messages=POEM, temperature=0, max_tokens=16, **sent)
    assert r.choices[0].message.content == reply_text(reference, want)
    assert r.usage.completion_tokens == len(want)


def test_chat_logprobs_are_the_raw_log_softmax(client, reference):
    r = client.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5
    )
    tok = reference.tokenizer
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    ids = reference.chat_ids(QUESTION)
    generated = penalised_greedy(reference, ids, 6)
    assert [c.bytes for c in content] == [list(tok.token_bytes(t)) for t in generated]
    assert r.choices[0].message.content == reply_text(reference, generated)
    steps = raw_logits(reference, ids, generated)
    for c, token, x in zip(content, generated, steps, strict=False):
        lp = log_softmax(x)
        assert c.token == tok.token_text(token)
        assert c.logprob == pytest.approx(lp[token], abs=2e-3)
        top = np.argsort(-lp, kind="stable")[:5]
        assert [t.bytes for t in c.top_logprobs] == [list(tok.token_bytes(int(i))) for i in top]
        for t, i in zip(c.top_logprobs, top, strict=True):
            assert t.logprob == pytest.approx(lp[i], abs=2e-3)
        assert token == top[0]  # greedy: the chosen token is the most likely
    stream = client.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5, stream=True
    )
    streamed = [
        e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content
    ]
    assert [(e.token, e.bytes) for e in streamed] == [(c.token, c.bytes) for c in content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=2e-3)


def test_chat_logprobs_without_alternatives(client):
    r = client.chat.completions.create(
        model="m", messages=QUESTION, temperature=0, max_tokens=3, logprobs=True
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(c.top_logprobs == [] for c in content)
    assert all(c.logprob <= 0 for c in content)
    plain = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_legacy_shape(client, reference):
    prompt = "The three primary colors are"
    r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=5, logprobs=3)
    tok = reference.tokenizer
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    generated = penalised_greedy(reference, tok.encode(prompt), 5)
    assert [tok.token_text(t) for t in generated] == lp.tokens
    steps = raw_logits(reference, tok.encode(prompt), generated)
    for j, (token, x) in enumerate(zip(generated, steps, strict=False)):
        want = log_softmax(x)
        assert lp.token_logprobs[j] == pytest.approx(want[token], abs=2e-3)
        top = [int(i) for i in np.argsort(-want, kind="stable")[:3]]
        assert set(lp.top_logprobs[j]) == {tok.token_text(i) for i in [*top, token]}
        for i in top:
            assert lp.top_logprobs[j][tok.token_text(i)] == pytest.approx(want[i], abs=2e-3)
    stream = client.completions.create(
        model="m", prompt=prompt, temperature=0, max_tokens=5, logprobs=3, stream=True
    )
    chunks = [c.choices[0].logprobs for c in stream if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset


def test_assistant_message_sent_back_as_the_client_dumps_it(client):
    r = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=8)
    history = [*QUESTION, r.choices[0].message.model_dump(), {"role": "user", "content": "And of Spain?"}]
    again = client.chat.completions.create(model="m", messages=history, temperature=0, max_tokens=4)
    assert again.choices[0].message.content


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "logprobs is true"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "not in the vocabulary"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool-call support"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema", "required"),
        ({"top_k": 5}, "top_k", "unknown field"),
    ],
)
def test_refusals_reach_the_client(client, fields, param, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=QUESTION, max_tokens=1, extra_body=fields)
    assert e.value.body["param"] == param
    assert fragment in e.value.body["message"]


def test_every_generated_token_has_its_logprob_eos_and_stop_included(client, reference):
    tok = reference.tokenizer
    eos = {tok.token_text(t) for t in tok.eos_ids}
    for stream in (False, True):
        for stop in (None, " is"):
            r = client.chat.completions.create(
                model="m", messages=QUESTION, temperature=0, max_tokens=24, logprobs=True, stop=stop,
                stream=stream, stream_options={"include_usage": True} if stream else None,
            )  # fmt: skip
            if stream:
                chunks = list(r)
                usage, finish = (
                    chunks[-1].usage,
                    [c for c in chunks if c.choices][-1].choices[0].finish_reason,
                )
                content = [
                    e
                    for c in chunks
                    if c.choices and c.choices[0].logprobs
                    for e in c.choices[0].logprobs.content
                ]
            else:
                usage, finish, content = r.usage, r.choices[0].finish_reason, r.choices[0].logprobs.content
            assert finish == "stop"
            assert len(content) == usage.completion_tokens
            if stop is None:
                assert content[-1].token in eos  # the reply ended with EOS, which has its log-probability too
            else:
                assert content[-1].token == " is"  # the token that completed the stop string
