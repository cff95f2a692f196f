"""The official `openai` client against a live dllama-api on the embedded SmolLM2: chat (plain and streamed),
completions, models, stop strings, max_tokens, seeds, and greedy output equal to `dllama inference`."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from apiserver import ROOT

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_non_streaming_matches_reference(client, reference):
    r = client.chat.completions.create(model="any", messages=QUESTION, temperature=0, max_tokens=24)
    ids = reference.chat_ids(QUESTION)
    expected = reference.greedy(ids, 24)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert "Paris" in expected
    assert r.choices[0].finish_reason == "stop"  # the model ended its answer (EOS) within 24 tokens
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens >= len(reference.tokenizer.encode(expected, bos=False))
    assert r.model == client.models.list().data[0].id


def test_chat_streaming_chunks(client, reference):
    stream = client.chat.completions.create(
        model="any",
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = reference.greedy(reference.chat_ids(QUESTION), 24)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choice) == expected
    assert [c.choices[0].finish_reason for c in with_choice][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    usage = chunks[-1].usage  # include_usage: a last chunk with no choices carries the counts
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == len(reference.chat_ids(QUESTION))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_ids_are_unique(client):
    ids = {client.chat.completions.create(model="m", messages=QUESTION, max_tokens=1).id for _ in range(3)}
    assert len(ids) == 3


def test_text_parts_content_equals_string_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    a = client.chat.completions.create(model="m", messages=parts, temperature=0, max_tokens=12)
    b = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_completions(client, reference):
    prompt = "The three primary colors are"
    r = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=10)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == reference.greedy(reference.tokenizer.encode(prompt), 10, reply_start=False)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 10
    streamed = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=10, stream=True)
    chunks = list(streamed)
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list(client, smollm2_path):
    models = client.models.list().data
    assert [m.id for m in models] == [smollm2_path.name]
    card = models[0].model_dump()
    assert card["object"] == "model"
    assert card["context_length"] == 4096  # min(model's 8192, the default --max-seq-len 4096)
    assert card["n_nodes"] == 1
    assert client.models.retrieve(smollm2_path.name).id == smollm2_path.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_max_tokens_gives_length(client):
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, **{field: 3})
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3


def test_stop_strings(client, reference):
    full = reference.greedy(reference.chat_ids(QUESTION), 24)  # "The capital of France is Paris."
    for stop in ("Paris", ["xyz", " is"], " of Fr"):  # " of Fr" spans two tokens (" of", " France")
        first = min(full.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
        r = client.chat.completions.create(
            model="m", messages=QUESTION, temperature=0, max_tokens=24, stop=stop
        )
        assert r.choices[0].message.content == full[:first]
        assert r.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(
            model="m", messages=QUESTION, temperature=0, max_tokens=24, stop=stop, stream=True
        )
        chunks = [c for c in stream if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:first]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible_at_temperature(client):
    ask = [{"role": "user", "content": "Write one sentence about the sea."}]

    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model="m", messages=ask, temperature=1.0, top_p=1.0, seed=seed, max_tokens=8
        )
        return r.choices[0].message.content

    a, b = sample(1234), sample(1234)
    assert a == b
    others = {sample(s) for s in (1, 2)}
    assert len(others | {a}) > 1  # different seeds give different samples


@pytest.mark.slow
def test_greedy_equals_dllama_inference(client, tmp_path):
    prompt = "Once upon a time, in a small village,"
    out = tmp_path / "inference.json"
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "inference", "--prompt", prompt, "--steps", "16",
         "--temperature", "0", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cli = json.loads(out.read_text())
    api = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16)
    assert api.choices[0].text == cli["text"]
    assert api.usage.prompt_tokens == len(cli["prompt_ids"])
    assert api.usage.completion_tokens == len(cli["generated_ids"])


def test_client_errors(client, reference):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=QUESTION, n=9)
    assert "less than or equal to 8" in str(e.value)
    long = [{"role": "user", "content": "hello " * 5000}]
    n = len(reference.chat_ids(long))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=long, stream=stream)
        assert str(n) in str(e.value) and "4096" in str(e.value)
        assert e.value.code == "context_length_exceeded"
