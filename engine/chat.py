"""`dllama chat`: a multi-turn conversation that keeps its KV cache, pre-filling only each new turn."""

from __future__ import annotations

import sys

from engine.chat_template import ChatTemplate
from engine.errors import DllamaError
from engine.generate import Metrics, generate
from engine.loader import Loaded
from engine.sampler import Sampler


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


TURN_LIMIT = 1 << 20  # bytes of one user turn: far more than any context holds


def _ask(prompt: str, interactive: bool) -> str:
    """One line of stdin (the prompt shown when interactive); bytes that are not UTF-8 become U+FFFD, as in
    llama.cpp; EOFError at the end of the input."""
    if interactive:
        print(prompt, end="", flush=True)
    line = sys.stdin.buffer.readline(TURN_LIMIT + 1)
    if not line:
        raise EOFError
    if len(line) > TURN_LIMIT:
        raise DllamaError(f"a chat turn on stdin is over {TURN_LIMIT >> 20} MiB: more than any context holds")
    return line.decode("utf-8", "replace").rstrip("\r\n")


def run_chat(
    loaded: Loaded,
    system: str | None,
    template_name: str | None,
    max_tokens: int,
    temperature: float,
    topp: float,
    seed: int | None,
) -> None:
    """Read user turns from stdin until EOF (Ctrl-C ends the program: exit 130); stream each reply."""
    tok, runner = loaded.tokenizer, loaded.runner
    template = ChatTemplate.for_tokenizer(tok, template_name)
    sampler = Sampler(tok.vocab_size, temperature, topp, seed)
    interactive = sys.stdin.isatty()
    messages: list[dict] = []
    cached: list[int] = []  # tokens whose keys/values sit in the cache, positions 0..len-1
    try:
        if system is None and interactive:
            system = _ask("💻 System prompt (optional): ", True)
        if system:
            messages.append({"role": "system", "content": system})
        while True:
            user = _ask("\n👱 User\n> ", interactive)
            if not user.strip():
                continue
            messages.append({"role": "user", "content": user})
            ids = template.encode(tok, messages)
            if len(ids) >= runner.max_seq_len:
                print(
                    f"\n(the context is full: this conversation needs {len(ids)} tokens, --max-seq-len is "
                    f"{runner.max_seq_len}; start a new chat or raise --max-seq-len)"
                )
                return
            start = min(common_prefix(ids, cached), len(ids) - 1)
            print("\n🤖 Assistant", flush=True)
            m = Metrics()
            for ev in generate(
                runner, tok, ids[start:], max_tokens, sampler, start_pos=start, metrics=m, reply_start=True
            ):
                if ev.kind == "token":
                    print(ev.text, end="", flush=True)
            print(flush=True)
            cached = ids + m.generated[:-1]  # the last sampled token was never fed
            reply = [t for t in m.generated if t not in tok.eos_ids]
            messages.append({"role": "assistant", "content": tok.decode(reply)})
            if m.stop_reason == "context":
                print(
                    f"(the context is full: {runner.max_seq_len} tokens; "
                    "start a new chat or raise --max-seq-len)"
                )
                return
    except EOFError:
        print(flush=True)
