"""response_format through the `openai` client: JSON mode and JSON schemas, streamed or not, on SmolLM2.

The model is small and unprompted with the schema, so whatever it emits comes from the grammar's mask: each
answer must parse and validate (jsonschema) against the schema it was asked for. Strings and arrays carry
maxLength / maxItems so that answers end well inside max_tokens.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

ASK = [
    {"role": "system", "content": "You answer with JSON only."},
    {"role": "user", "content": "Describe a person you know."},
]
NAME = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {
        "type": "object",
        "properties": {"happy": {"type": "boolean"}},
        "required": ["happy"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"first": NAME, "last": NAME},
                "required": ["first", "last"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}, "ok": {"type": "boolean"}},
        "required": ["score", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 100, "maximum": 999}, "code": {"const": "X1"}},
        "required": ["id", "code"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"when": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["when"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "note": NAME},
        "required": ["value", "note"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
]


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_object_mode(client):
    r = client.chat.completions.create(
        model="m", messages=ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=120
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # the grammar ended: EOS was forced
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_mode_changes_the_answer(client):
    """Without the constraint the same greedy request is not JSON: the mask, not the prompt, makes it so."""
    r = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_json_schema_output_validates(client, schema):
    r = client.chat.completions.create(
        model="m", messages=ASK, response_format=_schema_format(schema), temperature=0, max_tokens=100
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed_with_sampling(client):
    """Streamed, at temperature 1: the joined deltas validate, for a few seeds."""
    schema = SCHEMAS[4]
    for seed in (1, 2, 3):
        stream = client.chat.completions.create(
            model="m",
            messages=ASK,
            response_format=_schema_format(schema),
            temperature=1.0,
            seed=seed,
            max_tokens=100,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "schema",
    [{"type": "no-such-type"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}],
)
def test_invalid_schema_is_400(client, schema):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="m", messages=ASK, response_format=_schema_format(schema), stream=stream
            )
        assert "not a usable JSON schema" in str(e.value)
        assert e.value.param == "response_format"
