"""Tool calling: reading calls out of a reply, and the `openai` client against Qwen2.5-Coder (whose template
takes tools) with tool_choice required, named, none and a tool turn; SmolLM2's template refuses tools."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from apiserver import ApiServer

from engine.server.tools import parse_calls

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "A city's weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
PARAMS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_parse_calls():
    text = (
        'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": [1, "é"]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "g"}\n</tool_call>'
    )
    content, calls = parse_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["f", "g"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": [1, "é"]}, {}]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    for plain in (
        "no call here",
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>{"name": 1}</tool_call>',
    ):
        assert parse_calls(plain) == (plain, [])


def test_smollm2_template_refuses_tools(api):
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice)
        assert e.value.param == "tools" and "no tool-call support" in str(e.value)


@pytest.fixture(scope="module")
def qwen(qwen25_path, tmp_path_factory) -> openai.OpenAI:
    server = ApiServer(["--model", str(qwen25_path)], tmp_path_factory.mktemp("qwen") / "server.log")
    try:
        server.wait_health(200)
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.stop()


def _ask(client: openai.OpenAI, messages=ASK, max_tokens: int = 60, **kw):
    return client.chat.completions.create(
        model="m", messages=messages, tools=TOOLS, temperature=0, max_tokens=max_tokens, **kw
    )


def _valid_call(call) -> dict:
    assert call.type == "function" and call.id
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


def test_required_and_named_calls_follow_the_parameters(qwen):
    r = _ask(qwen, tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    _valid_call(choice.message.tool_calls[0])
    # named: "add" is forced although the question is about the weather
    r = _ask(qwen, tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
    _valid_call(call)


def test_streamed_call_equals_the_whole_one(qwen):
    whole = _ask(qwen, tool_choice="required").choices[0].message.tool_calls[0]
    chunks = [c for c in _ask(qwen, tool_choice="required", stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 1 and deltas[0].index == 0
    assert (deltas[0].function.name, deltas[0].function.arguments) == (
        whole.function.name,
        whole.function.arguments,
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text_without_the_tools(qwen):
    plain = qwen.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=20)
    r = _ask(qwen, tool_choice="none", max_tokens=20)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content  # tools are not shown at all
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_tool_turn_goes_back_to_the_model(qwen):
    call = _ask(qwen, tool_choice="required").choices[0].message
    before = _ask(qwen, tool_choice="none", max_tokens=1).usage.prompt_tokens
    result = {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "22 degrees and sunny"}
    r = _ask(qwen, [*ASK, call.model_dump(exclude_none=True), result], max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > before + 10  # the tools, the call and its result are in the prompt
