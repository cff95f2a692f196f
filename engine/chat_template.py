"""Chat templates: the model's own Jinja template, or a built-in one for files that carry none.

Rendering follows HF transformers' conventions (sandboxed Jinja, trim_blocks/lstrip_blocks, `raise_exception`,
`strftime_now`, `tojson`, `bos_token`/`eos_token`). The built-ins leave the leading BOS to the encoder and
avoid distributed-llama's B3/B4 bugs: Llama 3 turns close with <|eot_id|>, ChatML opens the assistant
turn once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import DllamaError
from engine.tokenizer import Tokenizer

BUILTIN_TEMPLATES: dict[str, str] = {
    "llama2": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- if not loop.first -%}{{ bos_token }}{%- endif -%}"
        "{{ '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + ' ' + eos_token }}"
        "{%- else -%}{{ raise_exception('llama2 template: only a leading system message, then user and "
        "assistant turns') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "llama3": (
        "{%- for m in messages -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif -%}"
    ),
    "chatml": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "deepseek": (
        "{%- if messages and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '<｜User｜>' + m['content'] }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ '<｜Assistant｜>' + m['content'].split('</think>')[-1] + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\\n' }}{%- endif -%}"
    ),
}

# Special-token text that identifies a built-in family, checked in this order.
_FAMILY_MARKERS = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("<｜Assistant｜>", "deepseek"),
)


class _TemplateRaised(jinja2.TemplateError):
    """What the template's raise_exception() throws."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def guess_template_name(special_tokens: Any) -> str:
    """The built-in family whose marker token is in the vocabulary's special tokens; llama2 otherwise."""
    for marker, name in _FAMILY_MARKERS:
        if marker in special_tokens:
            return name
    return "llama2"


class ChatTemplate:
    """A compiled chat template; `render` turns a message list into the prompt text."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "model"):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = env.from_string(source)
            uses = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            msg = f"chat template ({name}): syntax error on line {e.lineno}: {e.message}"
            raise DllamaError(msg) from None
        # Hermes-style tool calls (Qwen2.5): `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
        self.tool_calls = "tools" in uses and "<tool_call>" in source and "</tool_call>" in source

    @classmethod
    def builtin(cls, name: str, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """One of BUILTIN_TEMPLATES by name."""
        if name not in BUILTIN_TEMPLATES:
            raise DllamaError(f"unknown chat template {name!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})")
        return cls(BUILTIN_TEMPLATES[name], bos_token=bos_token, eos_token=eos_token, name=name)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, name: str | None = None) -> ChatTemplate:
        """The built-in `name` if given, else the model's own template, else a built-in guessed from the
        vocabulary's special tokens."""
        bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        eos = tokenizer.token_text(tokenizer.eos_ids[0]) if tokenizer.eos_ids else ""
        if name is None and tokenizer.chat_template:
            return cls(tokenizer.chat_template, bos_token=bos, eos_token=eos)
        chosen = name if name is not None else guess_template_name(tokenizer.special_tokens)
        return cls.builtin(chosen, bos_token=bos, eos_token=eos)

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The prompt text for `messages` (dicts with role and content); opens the assistant turn if asked;
        `tools` (OpenAI's tool objects) go to templates that take them."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
            )
        except Exception as e:  # any failure inside a template is the template's (or the messages') problem
            raise DllamaError(f"chat template ({self.name}) failed: {type(e).__name__}: {e}") from None

    def encode(
        self,
        tokenizer: Tokenizer,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Render and encode; BOS per the model's flag unless the rendered text already starts with it."""
        text = self.render(messages, add_generation_prompt, tools)
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return tokenizer.encode(text, bos=tokenizer.add_bos and not starts_with_bos)
