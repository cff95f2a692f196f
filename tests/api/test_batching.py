"""Continuous batching (--parallel 4): concurrent streams decode together and each equals its answer alone,
a conversation that extends a slot's cache pre-fills only its new tokens, a client that goes away frees its
slot for a waiting request, and 64 clients at once get only 200s and 429s; a Vulkan node and a cluster with a
Vulkan root batch too."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from apiserver import ApiServer, Worker, chunks_json

from engine.chat import common_prefix

pytestmark = pytest.mark.slow  # a second embedded-model server

CHAT = "/v1/chat/completions"
TOPICS = ["France", "Japan", "Kenya", "Peru"]
MAX_TOKENS = 12


def _question(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about the history of {topic}."}]


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    args = ["--parallel", "4", "--queue-size", "4", "--max-seq-len", "512"]
    server = ApiServer(args, tmp_path_factory.mktemp("batched") / "server.log")
    try:
        server.wait_health(200)
        yield server
    finally:
        server.stop()


def _stream(server: ApiServer, body: dict, times: list[float], out: dict, key: int) -> None:
    """POST a streaming chat request; `times` gets the arrival time of every content chunk."""
    with httpx.stream("POST", server.url + CHAT, json={**body, "stream": True}, timeout=600) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                times.append(time.monotonic())
        out[key] = (r.status_code, "\n".join(lines))


def _text(body: str) -> str:
    chunks, done = chunks_json(body)
    assert done
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def test_concurrent_streams_decode_together_and_equal_each_alone(batched, reference):
    bodies = [{"messages": _question(t), "temperature": 0, "max_tokens": MAX_TOKENS} for t in TOPICS]
    times: list[list[float]] = [[] for _ in TOPICS]
    results: dict[int, tuple[int, str]] = {}
    threads = [
        threading.Thread(target=_stream, args=(batched, b, times[i], results, i))
        for i, b in enumerate(bodies)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(results) == list(range(len(TOPICS)))
    # together: every stream had its first token before any stream had its last
    assert max(ts[0] for ts in times) < min(ts[-1] for ts in times), times
    for i, topic in enumerate(TOPICS):
        status, body = results[i]
        assert status == 200, body
        alone = reference.greedy(reference.chat_ids(_question(topic)), MAX_TOKENS)
        assert _text(body) == alone, topic
        one = {}
        _stream(batched, bodies[i], [], one, 0)  # the same request again, alone on the server
        assert _text(one[0][1]) == alone, topic


def _metric(server: ApiServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(re.search(rf"^dllama_{name} (\S+)$", text, re.M).group(1))


def _two_streams_together_equal_reference(server: ApiServer, reference) -> None:
    """Two greedy streams decoded together on `server` each give the CPU reference's text alone."""
    bodies = [{"messages": _question(t), "temperature": 0, "max_tokens": MAX_TOKENS} for t in TOPICS[:2]]
    times: list[list[float]] = [[], []]
    results: dict[int, tuple[int, str]] = {}
    threads = [
        threading.Thread(target=_stream, args=(server, b, times[i], results, i)) for i, b in enumerate(bodies)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(results) == [0, 1]
    assert max(ts[0] for ts in times) < min(ts[-1] for ts in times), times  # decoded together
    for i, topic in enumerate(TOPICS[:2]):
        status, body = results[i]
        assert status == 200, body
        assert _text(body) == reference.greedy(reference.chat_ids(_question(topic)), MAX_TOKENS), topic


def test_parallel_streams_on_a_vulkan_node_equal_each_alone(tmp_path, reference):
    """--parallel 2 on one Vulkan node: two streams decoded together give the CPU reference's greedy text."""
    args = ["--backend", "vulkan", "--parallel", "2", "--max-seq-len", "256"]
    server = ApiServer(args, tmp_path / "server.log")
    try:
        server.wait_health(200)
        assert "backend Vulkan" in server.log()
        _two_streams_together_equal_reference(server, reference)
    finally:
        server.stop()


def test_parallel_streams_on_a_vulkan_root_with_a_cpu_worker_equal_each_alone(tmp_path, reference):
    """--parallel 2 on a Vulkan root with a CPU worker: both nodes run the slotted graph, and two streams
    decoded together give the CPU reference's greedy text."""
    worker = Worker(0, tmp_path / "worker.log")
    server = None
    try:
        args = ["--backend", "vulkan", "--parallel", "2", "--max-seq-len", "256"]
        server = ApiServer(
            [*args, "--workers", f"127.0.0.1:{worker.port}", "--split", "1,1"], tmp_path / "s.log"
        )
        assert server.wait_health(200)["nodes"] == 2
        nodes = httpx.get(server.url + "/v1/cluster", timeout=10).json()["nodes"]
        assert [(n["role"], n["backend"]) for n in nodes] == [("root", "vulkan"), ("worker", "cpu")]
        assert _metric(server, "slots_total") == 2
        _two_streams_together_equal_reference(server, reference)
    finally:
        if server is not None:
            server.stop()
        worker.stop()


def test_extended_conversation_prefills_only_its_new_tokens(batched, reference):
    first = [{"role": "user", "content": "Name a colour of the sky at sunset."}]
    r = batched.post(CHAT, {"messages": first, "temperature": 0, "max_tokens": 6})
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And at noon?"}]
    cache = reference.chat_ids(first)  # at least the first prompt sits in its slot's cache
    ids = reference.chat_ids(second)
    shared = common_prefix(ids, cache)
    assert 0 < shared < len(ids)
    reused = _metric(batched, "prompt_tokens_reused_total")
    r = batched.post(CHAT, {"messages": second, "temperature": 0, "max_tokens": 4})
    assert r.status_code == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert (
        shared <= cached < len(ids)
    )  # the first prompt (and maybe part of the answer) is not computed again
    assert _metric(batched, "prompt_tokens_reused_total") - reused == cached
    assert r.json()["choices"][0]["message"]["content"] == reference.greedy(ids, 4)


def test_client_that_goes_away_frees_its_slot_for_a_waiting_request(batched, reference):
    no_eos = {str(t): -100 for t in reference.tokenizer.eos_ids}
    long = {"prompt": "Once upon a time", "max_tokens": 400, "stream": True, "logit_bias": no_eos}
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", batched.url + "/v1/completions", json=long) for _ in range(4)]
        opened = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in opened]
        for it in lines:
            next(it)  # every slot is generating
        assert _metric(batched, "slots_used") == 4
        done: list[tuple[int, float]] = []
        waiting = threading.Thread(
            target=lambda: done.append(
                (
                    batched.post(CHAT, {"messages": _question("Chile"), "max_tokens": 2}).status_code,
                    time.monotonic(),
                )
            )
        )
        waiting.start()
        deadline = time.monotonic() + 30
        while _metric(batched, "queue_length") != 1:
            assert time.monotonic() < deadline, "the fifth request never waited"
            time.sleep(0.05)
        streams[0].__exit__(None, None, None)  # one client goes away
        waiting.join(120)
        assert done and done[0][0] == 200
        for it in lines[1:]:
            next(it)  # the other three are still generating
        assert _metric(batched, "slots_used") == 3
        for s in streams[1:]:
            s.__exit__(None, None, None)


def test_sixty_four_clients_get_only_200_and_429(batched):
    statuses: list[int] = []
    barrier = threading.Barrier(64)

    def client() -> None:
        barrier.wait()
        r = httpx.post(
            batched.url + CHAT, json={"messages": _question("Chile"), "max_tokens": 2}, timeout=600
        )
        statuses.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(statuses) == 64 and set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses  # 4 slots + 4 waiting places cannot take 64 at once
