"""Chat templates: SmolLM2's and Qwen2.5-Coder's own Jinja templates against the golden chat prompts; the
built-ins by hand."""

from __future__ import annotations

import datetime
import json

import pytest

from engine.chat_template import BUILTIN_TEMPLATES, ChatTemplate, guess_template_name
from engine.errors import DllamaError
from engine.gguf_file import read_gguf
from engine.tokenizer import tokenizer_from_gguf

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
]

EXPECTED = {
    "llama2": "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] Bye? [/INST]",
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "deepseek": "You are terse.<｜User｜>Hi!<｜Assistant｜>Hello.</s><｜User｜>Bye?<｜Assistant｜><think>\n",
}


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return tokenizer_from_gguf(read_gguf(smollm2_path)[0])


@pytest.fixture(scope="module")
def llama_spm(shared):
    return tokenizer_from_gguf(read_gguf(shared / "tokenizers/ggml-vocab-llama-spm.gguf")[0])


def test_smollm2_template_renders_golden_chats(shared, smollm2):
    cases = json.loads((shared / "smollm2_golden.json").read_text())["cases"]
    chats = [c for c in cases if c["kind"] == "chat"]
    assert len(chats) == 2
    template = ChatTemplate.for_tokenizer(smollm2)
    assert template.name == "model"
    for case in chats:
        assert template.render(case["messages"]) == case["text"]
        assert template.encode(smollm2, case["messages"]) == case["prompt_ids"]


QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_SYSTEM = f"<|im_start|>system\n{QWEN_DEFAULT}<|im_end|>\n"


def test_qwen25_template_renders_the_golden_chat(qwen25_tokenizer, qwen25_golden):
    meta, arrays = qwen25_golden
    chat = meta["cases"][1]
    assert chat["kind"] == "chat" and chat["prompt_ids"] == arrays["case1_prompt_ids"].tolist()
    template = ChatTemplate.for_tokenizer(qwen25_tokenizer)
    assert template.name == "model" and "tool_call" in template.source  # the file's own, tool branches too
    text = template.render(chat["messages"])
    user = chat["messages"][0]["content"]
    assert text == f"{QWEN_SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert template.encode(qwen25_tokenizer, chat["messages"]) == chat["prompt_ids"]


def test_qwen25_template_with_a_system_message_and_history(qwen25_tokenizer):
    template = ChatTemplate.for_tokenizer(qwen25_tokenizer)
    assert template.render(CONVERSATION) == EXPECTED["chatml"]  # a given system line replaces the default
    text = template.render(CONVERSATION[1:3], add_generation_prompt=False)
    assert text == f"{QWEN_SYSTEM}<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"


def test_tool_call_support_and_qwen25_tool_turns(qwen25_tokenizer, smollm2):
    """Qwen2.5's template takes tools in the <tool_call> format; SmolLM2's and the built-ins take none."""
    template = ChatTemplate.for_tokenizer(qwen25_tokenizer)
    assert template.tool_calls
    assert not ChatTemplate.for_tokenizer(smollm2).tool_calls
    assert not any(ChatTemplate.builtin(name).tool_calls for name in BUILTIN_TEMPLATES)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    messages = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    text = template.render(messages, tools=[tool])
    assert "<tools>\n" + json.dumps(tool) + "\n</tools>" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>'
        in text
    )
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_two_turn_conversation(name):
    template = ChatTemplate.builtin(name, bos_token="<s>", eos_token="</s>")
    assert template.render(CONVERSATION) == EXPECTED[name]


def test_builtin_without_generation_prompt():
    chatml = ChatTemplate.builtin("chatml")
    text = chatml.render(CONVERSATION[:3], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nHello.<|im_end|>\n")
    assert text.count("<|im_start|>assistant") == 1
    llama3 = ChatTemplate.builtin("llama3")
    assert llama3.render([{"role": "user", "content": "  x \n"}], add_generation_prompt=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
    )


def test_deepseek_drops_earlier_reasoning():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA"}]
    text = ChatTemplate.builtin("deepseek", eos_token="<E>").render(msgs, add_generation_prompt=False)
    assert text == "<｜User｜>Q<｜Assistant｜>\n\nA<E>"


def test_guess_from_special_tokens():
    assert guess_template_name({"<|begin_of_text|>", "<|start_header_id|>"}) == "llama3"
    assert guess_template_name({"<|im_start|>", "<|im_end|>"}) == "chatml"
    assert guess_template_name({"<｜begin▁of▁sentence｜>", "<｜Assistant｜>"}) == "deepseek"
    assert guess_template_name({"<s>", "</s>"}) == "llama2"


def test_for_tokenizer_choice_and_bos(llama_spm, smollm2):
    template = ChatTemplate.for_tokenizer(llama_spm)  # the vocab-only GGUF carries no template
    assert template.name == "llama2" and (template.bos_token, template.eos_token) == ("<s>", "</s>")
    ids = template.encode(llama_spm, [{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(1) == 1 and llama_spm.decode(ids[1:]) == "[INST] Hi [/INST]"
    assert ChatTemplate.for_tokenizer(smollm2, "llama3").name == "llama3"
    starts_with_bos = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] }}", bos_token="<s>")
    ids = starts_with_bos.encode(llama_spm, [{"role": "user", "content": "Hi"}])
    assert ids.count(1) == 1 and ids[0] == 1


def test_helpers_available_to_templates():
    source = "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{{ eos_token }}"
    template = ChatTemplate(source, eos_token="<e>")
    year, data, eos = template.render([{"role": "user", "content": "é"}]).split("|")
    assert int(year) == datetime.date.today().year
    assert json.loads(data) == [{"role": "user", "content": "é"}] and "é" in data
    assert eos == "<e>"


def test_template_errors():
    with pytest.raises(DllamaError, match="syntax error on line 1"):
        ChatTemplate("{% for m in messages %}{{ m }")
    raising = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(DllamaError, match="Conversation roles must alternate"):
        raising.render(CONVERSATION)
    with pytest.raises(DllamaError, match="chat template"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(CONVERSATION)  # the sandbox refuses
    with pytest.raises(DllamaError, match="llama2 template"):
        ChatTemplate.builtin("llama2").render([{"role": "tool", "content": "x"}])
    with pytest.raises(DllamaError, match="unknown chat template 'mistral'"):
        ChatTemplate.builtin("mistral")
