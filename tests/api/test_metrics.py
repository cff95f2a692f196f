"""GET /metrics on a fresh server: well-formed Prometheus text whose counters follow the requests made."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from apiserver import ApiServer

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    server = ApiServer(["--parallel", "1"], tmp_path_factory.mktemp("metrics") / "server.log")
    try:
        server.wait_health(200)
        yield server
    finally:
        server.stop()


def scrape(server: ApiServer) -> dict[str, float]:
    """The samples by name with labels; every family has its HELP and TYPE lines before its samples."""
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    typed, samples = {}, {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge")
            typed[name] = kind
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            m = SAMPLE.match(line)
            assert m, line
            assert m.group(1) in typed, f"{m.group(1)} has no TYPE line before it"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def requests_total(endpoint: str, status: int) -> str:
    return f'dllama_requests_total{{endpoint="{endpoint}",status="{status}"}}'


def test_counters_follow_requests(fresh, reference):
    before = scrape(fresh)
    assert before["dllama_generated_tokens_total"] == 0
    assert before["dllama_queue_length"] == 0 and before["dllama_slots_used"] == 0
    assert before["dllama_slots_total"] == 1
    chat = fresh.post(CHAT, {"messages": HI, "max_tokens": 3, "temperature": 0}).json()
    assert chat["usage"]["completion_tokens"] == 3
    assert fresh.post(CHAT, {"messages": HI, "top_k": 1}).status_code == 400
    body = {"prompt": "The sky is", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", fresh.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    assert httpx.get(fresh.url + "/no/such/route", timeout=10).status_code == 404
    after = scrape(fresh)
    assert after["dllama_generated_tokens_total"] == 5
    prompt_tokens = chat["usage"]["prompt_tokens"] + len(reference.tokenizer.encode("The sky is"))
    assert after["dllama_prompt_tokens_total"] == prompt_tokens
    assert after[requests_total(CHAT, 200)] == 1
    assert after[requests_total(CHAT, 400)] == 1
    assert after[requests_total("/v1/completions", 200)] == 1
    assert after[requests_total("other", 404)] == 1
    assert after[requests_total("/metrics", 200)] == before.get(requests_total("/metrics", 200), 0) + 1
    assert after["dllama_last_request_tokens_per_second"] > 0  # two tokens: one decode interval


def test_slot_and_queue_while_busy(fresh, reference):
    no_eos = {str(t): -100 for t in reference.tokenizer.eos_ids}  # the first request runs until closed
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "logit_bias": no_eos}
    waiting: list[int] = []
    with httpx.stream("POST", fresh.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # the generation has started
        second = threading.Thread(
            target=lambda: waiting.append(fresh.post(CHAT, {"messages": HI, "max_tokens": 1}).status_code)
        )
        second.start()
        deadline = time.monotonic() + 30
        while scrape(fresh)["dllama_queue_length"] != 1:
            assert time.monotonic() < deadline, "the second request never showed as waiting"
            time.sleep(0.05)
        assert scrape(fresh)["dllama_slots_used"] == 1
    second.join(60)
    assert waiting == [200]
    idle = scrape(fresh)
    assert idle["dllama_queue_length"] == 0 and idle["dllama_slots_used"] == 0
