"""A second server (--queue-size 1): the cached prefix never changes an answer (compared with this fresh
server), the queue bound gives 429, and SIGTERM finishes the running request, refuses the waiting one and
exits 0. The tests run in file order; the last one stops the server."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from apiserver import ApiServer, chunks_json

pytestmark = pytest.mark.slow  # a second embedded-model server

TURN1 = [{"role": "user", "content": "Name a fruit."}]
STORY = [{"role": "user", "content": "Write a very long story about a brave knight and a dragon."}]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    server = ApiServer(
        ["--queue-size", "1", "--parallel", "1"], tmp_path_factory.mktemp("fresh") / "server.log"
    )
    try:
        server.wait_health(200)
        yield server
    finally:
        server.stop()


def _chat(server: ApiServer, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_prefix_reuse_never_changes_the_answer(api, fresh, reference):
    first = _chat(api, TURN1, 12)
    turn2 = [*TURN1, first["choices"][0]["message"], {"role": "user", "content": "And a vegetable?"}]
    cached = _chat(api, turn2, 12)
    # the second turn extends the first conversation: its prompt and the reply came from the cache
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(reference.chat_ids(TURN1))
    new = _chat(fresh, turn2, 12)
    assert new["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert cached["choices"][0]["message"]["content"] == new["choices"][0]["message"]["content"]
    assert new["choices"][0]["message"]["content"] == reference.greedy(reference.chat_ids(turn2), 12)
    # an unrelated conversation in between resets the cache; the answer is still the same
    _chat(api, [{"role": "user", "content": "Say hello."}], 2)
    again = _chat(api, turn2, 12)
    assert again["choices"][0]["message"] == cached["choices"][0]["message"]


def _open_stream(server: ApiServer, messages: list[dict], max_tokens: int):
    client = httpx.Client(timeout=600)
    body = {"messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens}
    request = client.build_request("POST", server.url + "/v1/chat/completions", json=body)
    return client, client.send(request, stream=True)


def _wait_load(server: ApiServer, running: int, waiting: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        h = server.health().json()
        if (h["running"], h["waiting"]) == (running, waiting):
            return
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def test_full_queue_answers_429(fresh):
    a_client, a = _open_stream(fresh, STORY, 400)
    b_client, b = _open_stream(fresh, STORY, 400)
    try:
        assert a.status_code == 200 and b.status_code == 200
        _wait_load(fresh, running=1, waiting=1)
        for stream in (False, True):
            r = fresh.post("/v1/chat/completions", {"messages": TURN1, "max_tokens": 1, "stream": stream})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert r.json()["error"]["code"] == "queue_full"
    finally:
        for client, response in ((a_client, a), (b_client, b)):
            response.close()
            client.close()
    _wait_load(fresh, running=0, waiting=0)  # both cancelled by their disconnects
    assert _chat(fresh, TURN1, 2)["choices"][0]["finish_reason"] == "length"


def test_sigterm_finishes_running_refuses_waiting_and_exits(fresh):
    client, running = _open_stream(fresh, STORY, 40)
    waiting: dict = {}

    def queued() -> None:
        r = fresh.post("/v1/chat/completions", {"messages": TURN1, "max_tokens": 4})
        waiting.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=queued)
    t.start()
    try:
        _wait_load(fresh, running=1, waiting=1)
        fresh.signal(signal.SIGTERM)
        body = running.read().decode()
    finally:
        running.close()
        client.close()
    t.join(60)
    chunks, done = chunks_json(body)
    assert done and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert waiting["status"] == 503 and waiting["body"]["error"]["code"] == "shutting_down"
    assert fresh.proc.wait(30) == 0
    assert "Shutting down" in fresh.log()
