"""The web chat at / in a real headless Chromium (Debian's, driven by Playwright): it loads with no outside
request, shows the model and its node from /v1/cluster, streams a reply that grows on screen, keeps the
conversation across a reload, and its stop button ends a long reply, which the server sees as cancelled."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest
from apiserver import ApiServer
from playwright.sync_api import sync_playwright

CHAT = "/v1/chat/completions"
QUESTION = "What is the capital of France?"
STORY = "Write a very long story about a brave knight and a dragon."
# every change of the last assistant bubble's text length, recorded in the page
WATCH = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('.msg.assistant .text');
    const last = bubbles[bubbles.length - 1];
    const n = last ? last.textContent.length : 0;
    if (window.lengths[window.lengths.length - 1] !== n) window.lengths.push(n);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def chromium() -> str | None:
    """Debian's Chromium (tools/setup.sh installs it when run as root), or $DLLAMA_CHROMIUM."""
    return os.environ.get("DLLAMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ApiServer([], tmp_path_factory.mktemp("webchat") / "server.log")
    try:
        server.wait_health(200)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("no Chromium found: install Debian's `chromium` (tools/setup.sh does as root)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_page_is_self_contained(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and "/v1/chat/completions" in r.text
    assert not re.findall(r"https?:|//|src=|@import|url\(", r.text), "the page must work offline"


def test_chat_streams_persists_and_stops(server, browser):
    page = browser.new_page(viewport={"width": 900, "height": 640})
    outside, posts = [], []
    page.on("request", lambda req: None if req.url.startswith(server.url) else outside.append(req.url))
    page.on("request", lambda req: posts.append(req.post_data_json) if req.url.endswith(CHAT) else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('status-model').textContent.includes('SmolLM2')")
    assert "root · cpu · CPU (numba" in page.inner_text("#status-nodes")

    # a streamed reply ends as the server's own greedy answer
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming) .meta", timeout=120_000)
    assert posts[-1]["stream"] is True and posts[-1]["messages"] == [{"role": "user", "content": QUESTION}]
    reply = page.locator(".msg.assistant .text").text_content()
    plain = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24}
    assert reply == server.post(CHAT, plain).json()["choices"][0]["message"]["content"]
    assert "Paris" in reply
    page.wait_for_function("document.getElementById('status-rate').textContent.includes('tok/s')")

    # the conversation comes back from localStorage after a reload
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg .text").all_text_contents() == [QUESTION, reply]
    stored = json.loads(page.evaluate("localStorage.getItem('dllama-chat')"))
    assert [m["content"] for m in stored["messages"]] == [QUESTION, reply]

    # a long reply grows on screen, piece by piece; stop ends it and the server cancels the generation
    page.fill("#max-tokens", "2000")
    page.evaluate(WATCH)
    page.fill("#input", STORY)
    page.click("#send")
    page.wait_for_function("window.lengths.filter((n) => n > 0).length >= 5", timeout=120_000)
    assert page.locator(".msg.assistant.streaming").count() == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant:last-child:not(.streaming)")
    stopped = page.locator(".msg.assistant .text").last.text_content()
    grown = [n for n in page.evaluate("window.lengths") if n > 0]
    assert grown == sorted(set(grown)) and grown[-1] == len(stopped), grown
    assert page.locator(".msg.assistant .meta").last.inner_text() == "stopped"
    sent = posts[-1]
    assert sent["stream"] is True and sent["max_tokens"] == 2000
    assert [m["content"] for m in sent["messages"]] == [QUESTION, reply, STORY]
    log = server.wait_line(r"📝 \S+: \d+ prompt tokens \(\d+ cached\) \+ (\d+) generated, cancelled", 30)
    assert int(log.group(1)) < 2000
    time.sleep(1.0)
    assert page.locator(".msg.assistant .text").last.text_content() == stopped
    assert httpx.get(server.url + "/v1/cluster", timeout=10).json()["slots"]["used"] == 0

    # new chat empties the conversation, in the page and in localStorage
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert json.loads(page.evaluate("localStorage.getItem('dllama-chat')"))["messages"] == []
    assert outside == [], f"the page fetched from outside the server: {outside}"
    page.close()
