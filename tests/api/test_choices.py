"""`n` > 1 through the `openai` client: choice i is the n=1 answer with seed + i, streamed or not, with its
own index and finish_reason; usage counts the prompt once and every choice's tokens."""

from __future__ import annotations

import json

import openai
import pytest

ASK = [{"role": "user", "content": "Name a fruit."}]
SEED = 1234


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model="m", messages=ASK, temperature=1.0, max_tokens=12, **kw)


@pytest.fixture(scope="module")
def singles(client) -> list:
    """The n=1 answers with seeds SEED..SEED+3, each from its own request."""
    return [_chat(client, seed=SEED + i) for i in range(4)]


def test_chat_choices_equal_the_seeded_singles(client, singles):
    r = _chat(client, seed=SEED, n=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.message.content for c in r.choices] == [s.choices[0].message.content for s in singles]
    assert [c.finish_reason for c in r.choices] == [s.choices[0].finish_reason for s in singles]
    assert len({c.message.content for c in r.choices}) > 1  # independent draws, not one answer copied
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_choices_streamed(client, singles):
    stream = _chat(client, seed=SEED, n=4, stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            assert c.index not in finish  # nothing after a choice's finish chunk
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert texts == {i: s.choices[0].message.content for i, s in enumerate(singles)}
    assert finish == {i: s.choices[0].finish_reason for i, s in enumerate(singles)}
    assert usage is not None and usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_completion_choices_with_logprobs(client):
    kw = dict(model="m", prompt="The best fruit is", temperature=1.0, max_tokens=6, logprobs=1)
    singles = [client.completions.create(seed=SEED + i, **kw) for i in range(2)]
    r = client.completions.create(seed=SEED, n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    for c, s in zip(r.choices, singles, strict=True):
        assert c.text == s.choices[0].text
        assert c.logprobs.tokens == s.choices[0].logprobs.tokens
        assert c.logprobs.text_offset == s.choices[0].logprobs.text_offset  # each choice counts from 0


def test_choices_each_follow_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"fruit": {"type": "string", "maxLength": 10}},
        "required": ["fruit"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}
    r = client.chat.completions.create(
        model="m", messages=ASK, temperature=1.0, seed=SEED, n=3, max_tokens=30, response_format=fmt
    )
    assert len(r.choices) == 3
    for c in r.choices:
        value = json.loads(c.message.content)
        assert set(value) == {"fruit"} and len(value["fruit"]) <= 10
