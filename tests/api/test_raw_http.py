"""Malformed requests as raw HTTP bytes: each gets the right 4xx in OpenAI's error JSON, and the server
answers a valid request right after. Also CORS and unknown routes."""

from __future__ import annotations

import json

import pytest
from apiserver import post_request, raw_http

CHAT = "/v1/chat/completions"
USER = {"role": "user", "content": "Hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _chat(**fields) -> bytes:
    return json.dumps({"messages": [USER], **fields}).encode()


# (path, body bytes, expected status, expected `param` or None, a fragment of the message)
MALFORMED = [
    (CHAT, b"{", 400, None, "not valid JSON"),
    (CHAT, b"", 400, None, "empty"),
    (CHAT, b"[]", 400, None, "JSON object"),
    (CHAT, b"null", 400, None, "JSON object"),
    (CHAT, b'"hello"', 400, None, "JSON object"),
    (CHAT, b"\xff\xfe{\x00}", 400, None, "JSON"),
    (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None, "JSON"),
    (CHAT, b"{}", 400, "messages", "required"),
    (CHAT, b'{"messages": []}', 400, "messages", "at least one"),
    (CHAT, b'{"messages": "Hi"}', 400, "messages", "array"),
    (CHAT, b'{"messages": [{"role": "wizard", "content": "Hi"}]}', 400, "messages[0].role", "user"),
    (CHAT, b'{"messages": [{"content": "Hi"}]}', 400, "messages[0].role", "required"),
    (CHAT, b'{"messages": [{"role": "user"}]}', 400, "messages[0].content", "required"),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", "string"),
    (
        CHAT,
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
        400,
        "messages[0].content",
        "text",
    ),
    (CHAT, _chat(max_tokens="10"), 400, "max_tokens", "integer"),
    (CHAT, _chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    (CHAT, _chat(temperature="hot"), 400, "temperature", "number"),
    (CHAT, _chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    (
        CHAT,
        b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        400,
        "temperature",
        "finite",
    ),
    (CHAT, _chat(top_p=0), 400, "top_p", "greater than 0"),
    (CHAT, _chat(stream="yes"), 400, "stream", "boolean"),
    (CHAT, _chat(stop=5), 400, "stop", "string"),
    (CHAT, _chat(stop=[""]), 400, "stop", "empty"),
    (CHAT, _chat(n=9), 400, "n", "less than or equal to 8"),
    (CHAT, _chat(n=0), 400, "n", "greater than or equal to 1"),
    (CHAT, _chat(seed=1.5), 400, "seed", "integer"),
    (CHAT, _chat(stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", "boolean"),
    (CHAT, _chat(logprobs="yes"), 400, "logprobs", "boolean"),
    (CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "less than or equal to 20"),
    (CHAT, _chat(top_logprobs=0), 400, "top_logprobs", "logprobs is true"),
    (CHAT, _chat(stream_options={"include_usage": True}), 400, "stream_options", "stream is true"),
    (CHAT, _chat(stream=True, stream_options={"extra": 1}), 400, "stream_options.extra", "unknown field"),
    (CHAT, _chat(presence_penalty=2.5), 400, "presence_penalty", "less than or equal to 2"),
    (CHAT, _chat(frequency_penalty=-3), 400, "frequency_penalty", "greater than or equal to -2"),
    (CHAT, _chat(repetition_penalty=0), 400, "repetition_penalty", "greater than 0"),
    (CHAT, _chat(logit_bias={"12": 101}), 400, "logit_bias.12", "less than or equal to 100"),
    (CHAT, _chat(logit_bias={"dog": 1}), 400, "logit_bias", "token ids"),
    (CHAT, _chat(logit_bias={"-1": 1}), 400, "logit_bias", "token ids"),
    (CHAT, _chat(logit_bias={"49152": 1}), 400, "logit_bias", "not in the vocabulary"),
    (CHAT, _chat(logit_bias=[1]), 400, "logit_bias", "object"),
    (CHAT, _chat(response_format={"type": "xml"}), 400, "response_format", "json_schema"),
    (
        CHAT,
        _chat(response_format={"type": "json_object", "x": 1}),
        400,
        "response_format.json_object.x",
        "unknown field",
    ),
    (
        CHAT,
        _chat(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
        400,
        "response_format.json_schema.json_schema.name",
        "pattern",
    ),
    (
        CHAT,
        _chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 3}}}),
        400,
        "response_format",
        "not a usable JSON schema",
    ),
    (CHAT, _chat(tools=[{"type": "function"}]), 400, "tools[0].function", "required"),
    (CHAT, _chat(tools=[TOOL]), 400, "tools", "no tool-call support"),
    (CHAT, _chat(tool_choice="required"), 400, "tool_choice", "needs tools"),
    (
        CHAT,
        _chat(tools=[TOOL], response_format={"type": "json_object"}),
        400,
        "response_format",
        "not together",
    ),
    (
        CHAT,
        _chat(tools=[TOOL], tool_choice="none", parallel_tool_calls=False),
        400,
        "parallel_tool_calls",
        "only",
    ),
    (
        CHAT,
        _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "tool_choice",
        "no tool is named 'g'",
    ),
    (CHAT, _chat(messages=[{**USER, "tool_calls": [CALL]}]), 400, "messages[0].tool_calls", "only assistant"),
    (CHAT, _chat(messages=[{"role": "tool", "content": "1"}]), 400, "messages[0].tool_call_id", "required"),
    (
        CHAT,
        _chat(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}],
                },
            ]
        ),
        400,
        "messages[1].tool_calls[0].function.arguments",
        "JSON object",
    ),
    (CHAT, _chat(functions=[{"name": "f"}]), 400, "functions", "function calling"),
    (CHAT, _chat(modalities=["audio"]), 400, "modalities", "text"),
    (CHAT, _chat(store=True), 400, "store", "stored"),
    (CHAT, _chat(top_k=5), 400, "top_k", "unknown field"),
    (CHAT, _chat(messages=[{**USER, "name": "bob"}]), 400, "messages[0].name", "names"),
    (CHAT, _chat(messages=[{**USER, "mood": "x"}]), 400, "messages[0].mood", "unknown field"),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt", "string"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt", "one prompt"),
    ("/v1/completions", b'{"max_tokens": 5}', 400, "prompt", "required"),
    ("/v1/completions", b'{"prompt": "a", "echo": true}', 400, "echo", "not supported"),
    ("/v1/completions", b'{"prompt": "a", "suffix": "b"}', 400, "suffix", "not supported"),
    ("/v1/completions", b'{"prompt": "a", "best_of": 2}', 400, "best_of", "not supported"),
    ("/v1/completions", b'{"prompt": "a", "logprobs": true}', 400, "logprobs", "integer"),
    ("/v1/completions", b'{"prompt": "a", "logprobs": 21}', 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", b'{"prompt": "a", "tools": []}', 400, "tools", "unknown field"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt", "empty"),
    (
        CHAT,
        _chat(stream=True, messages=[{"role": "user", "content": "hello " * 5000}]),
        400,
        "messages",
        "4096",
    ),
    ("/v1/chat/completion", _chat(), 404, None, "no such route"),
    ("/v2/models", b"{}", 404, None, "no such route"),
]


def _valid_request_works(port: int) -> None:
    status, _, body = raw_http(port, post_request(CHAT, _chat(max_tokens=1, temperature=0)))
    assert status == 200, body
    assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "fragment"), MALFORMED, ids=range(len(MALFORMED))
)
def test_malformed_request(api, path, body, status, param, fragment):
    got, headers, raw = raw_http(api.port, post_request(path, body))
    assert got == status, raw
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert fragment in err["message"], err["message"]
    _valid_request_works(api.port)


NEUTRAL = [
    (CHAT, {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "user": "u-1"}),
    (CHAT, {"tools": [TOOL], "tool_choice": "none", "parallel_tool_calls": True}),
    (CHAT, {"functions": [], "modalities": ["text"], "store": False, "logprobs": False, "n": 1}),
    (
        CHAT,
        {"messages": [USER, {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": []}]},
    ),
    ("/v1/completions", {"prompt": "a", "echo": False, "suffix": "", "best_of": 1, "user": "u-1"}),
]


@pytest.mark.parametrize(("path", "fields"), NEUTRAL, ids=range(len(NEUTRAL)))
def test_neutral_values_of_unsupported_fields_are_accepted(api, path, fields):
    base = {"messages": [USER]} if path == CHAT else {}
    body = json.dumps({**base, "max_tokens": 1, **fields}).encode()
    status, _, raw = raw_http(api.port, post_request(path, body))
    assert status == 200, raw


def test_prompt_too_long_names_both_lengths(api, reference):
    messages = [{"role": "user", "content": "hello " * 5000}]
    n = len(reference.chat_ids(messages))
    for stream in (False, True):
        status, _, raw = raw_http(
            api.port, post_request(CHAT, json.dumps({"messages": messages, "stream": stream}).encode())
        )
        err = json.loads(raw)["error"]
        assert status == 400 and err["code"] == "context_length_exceeded"
        assert f"{n} tokens" in err["message"] and "4096 tokens" in err["message"]


def test_other_protocol_errors(api):
    cases = [
        (b"GARBAGE\r\n\r\n", 400),  # not HTTP at all: uvicorn's parser answers
        (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"POST /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /v1/models/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 100000000\r\n\r\n{}",
            413,
        ),
    ]
    for data, status in cases:
        got, _, raw = raw_http(api.port, data)
        assert got == status, raw
        if status != 400:
            assert "message" in json.loads(raw)["error"]
        _valid_request_works(api.port)


def test_no_content_type_is_still_json(api):
    status, _, body = raw_http(api.port, post_request(CHAT, _chat(max_tokens=1), content_type=None))
    assert status == 200, body


def test_cors(api):
    preflight = (
        b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nOrigin: http://ui.example\r\n"
        b"Access-Control-Request-Method: POST\r\n"
        b"Access-Control-Request-Headers: content-type, authorization\r\n\r\n"
    )
    status, headers, _ = raw_http(api.port, preflight)
    assert status == 200
    assert headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nOrigin: http://ui.example\r\n\r\n"
    status, headers, _ = raw_http(api.port, get)
    assert status == 200 and headers["access-control-allow-origin"] == "*"
