"""The README's examples (docs/api-examples, quoted verbatim there) run against a live server: only the port
9990 in their text is replaced with the test server's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apiserver import ROOT

EXAMPLES = ROOT / "docs" / "api-examples"


def _text(name: str, port: int) -> str:
    text = (EXAMPLES / name).read_text()
    assert text.count("127.0.0.1:9990") == 1
    return text.replace("127.0.0.1:9990", f"127.0.0.1:{port}")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(api, reference):
    r = subprocess.run(
        ["bash", "-c", _text("curl-chat.sh", api.port)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert answer["choices"][0]["message"]["content"] == reference.greedy(reference.chat_ids(messages), 32)
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_openai_client_example(api, reference):
    code = _text("openai-client.py", api.port)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert r.stdout == reference.greedy(reference.chat_ids(messages), 32) + "\n"


def test_readme_quotes_the_examples_verbatim():
    """The README shows exactly the files the tests run (without the curl script's shebang/comments)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    examples = Path(__file__).resolve().parents[2] / "docs" / "api-examples"
    client = (examples / "openai-client.py").read_text()
    curl = "".join(
        line
        for line in (examples / "curl-chat.sh").read_text().splitlines(keepends=True)
        if not line.startswith("#")
    )
    assert client.strip() in readme
    assert curl.strip() in readme
