"""Tool calls in the Hermes format of Qwen2.5's template: a JSON object {"name": N, "arguments": A} between
`<tool_call>` and `</tool_call>` lines.

`call_grammar` is the llguidance grammar of one call to one of the given functions, its arguments following
the function's parameter schema (tool_choice "required" or named); `parse_calls` reads the calls back out of
a reply, whether forced or written freely (tool_choice "auto").
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from engine.server.schemas import FunctionDef
from engine.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _tag(tok: Tokenizer, text: str) -> str:
    """The lark for a tag: its special token where the vocabulary has one, else the literal text."""
    special = tok.special_tokens.get(text)
    return f"<[{special}]>" if special is not None else json.dumps(text)


def call_grammar(functions: list[FunctionDef], tok: Tokenizer) -> str:
    """A lark grammar (llguidance's dialect) for exactly one call of one of `functions`."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters if f.parameters is not None else NO_PARAMETERS,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    open_tag, close_tag = _tag(tok, OPEN), _tag(tok, CLOSE)
    return f'start: {open_tag} "\\n" call "\\n" {close_tag}\ncall: %json {json.dumps(schema)}\n'


def parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the text before the first call, or None if empty; the calls as OpenAI's `tool_calls`). A block that
    is not a JSON object with a string name and object arguments is not a call; with no call at all the
    whole text is the content."""
    calls = []
    for block in _BLOCK.finditer(text):
        try:
            value = json.loads(block.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            continue
        args = value.get("arguments", {})
        if not isinstance(args, dict):
            continue
        function = {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function", "function": function})
    if not calls:
        return text, []
    content = text[: text.index(OPEN)].strip()
    return content or None, calls
