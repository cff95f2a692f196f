"""Fixtures of the dllama-api tests: a live server on the embedded SmolLM2 and an in-process reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apiserver import ApiServer


@pytest.fixture(scope="session")
def api(tmp_path_factory) -> Iterator[ApiServer]:
    """The shared server: embedded model, default options, sampling defaults of `dllama inference`."""
    server = ApiServer([], tmp_path_factory.mktemp("api") / "server.log")
    try:
        server.wait_health(200)
        yield server
    finally:
        server.stop()


class Reference:
    """The embedded model loaded in this process: expected outputs computed without any server code."""

    def __init__(self):
        from engine.chat_template import ChatTemplate
        from engine.loader import load

        self.loaded = load(None, None)
        self.tokenizer = self.loaded.tokenizer
        self.template = ChatTemplate.for_tokenizer(self.tokenizer)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.template.encode(self.tokenizer, messages)

    def greedy(self, ids: list[int], max_tokens: int, reply_start: bool = True) -> str:
        """Greedy text from a fresh prefill at position 0 (what any server answer must equal)."""
        from engine.generate import generate
        from engine.sampler import Sampler

        sampler = Sampler(self.tokenizer.vocab_size, temperature=0.0)
        runner = self.loaded.runner
        events = generate(runner, self.tokenizer, ids, max_tokens, sampler, reply_start=reply_start)
        return "".join(ev.text for ev in events if ev.kind == "token")


@pytest.fixture(scope="session")
def reference() -> Iterator[Reference]:
    ref = Reference()
    yield ref
    ref.loaded.runner.close()
