"""dllama-api as the root of a cluster (root + one worker on loopback): it serves; a worker killed mid-stream
fails that request with a 503 error event and turns /health to 503; once the worker is back the server
rebuilds the cluster by itself and serves again, the worker's slice cache sparing it the weights. With
--parallel 2 two concurrent requests decode together through the worker as they do on one node."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest
from apiserver import ApiServer, Worker

STORY = [{"role": "user", "content": "Write a very long story about a brave knight and a dragon."}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_cluster_fails_with_503_and_recovers(tmp_path):
    cache = ("--cache-dir", str(tmp_path / "slices"))
    worker = Worker(0, tmp_path / "worker1.log", cache)
    server = None
    try:
        # an even split: the cut must not move with the restarted worker's re-measured speed
        args = ["--workers", f"127.0.0.1:{worker.port}", "--split", "1,1"]
        server = ApiServer(args, tmp_path / "server.log")
        health = server.wait_health(200)
        assert health["nodes"] == 2
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        assert models["data"][0]["n_nodes"] == 2
        nodes = httpx.get(server.url + "/v1/cluster", timeout=10).json()["nodes"]
        assert [(n["node"], n["role"], n["backend"]) for n in nodes] == [
            (0, "root", "cpu"),
            (1, "worker", "cpu"),
        ]
        assert all(n["device"].startswith("CPU (numba") for n in nodes)
        r = server.post("/v1/chat/completions", {"messages": QUESTION, "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]

        # the worker dies while a reply is being streamed
        body = {"messages": STORY, "stream": True, "temperature": 0, "max_tokens": 400}
        events = []
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    worker.proc.kill()
                    worker.proc.wait(10)
        assert events[-1] != "[DONE]"
        error = json.loads(events[-1])["error"]
        assert error["code"] == "unavailable" and "503" not in error["message"]
        assert error["type"] == "service_unavailable"
        health = server.wait_health(503, timeout=30)
        assert health["status"] == "unavailable" and "worker 1" in health["message"]
        r = server.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"

        # the worker comes back on the same address: the server rebuilds the cluster without a restart
        worker.stop()
        worker = Worker(worker.port, tmp_path / "worker2.log", cache)
        assert server.wait_health(200, timeout=180)["nodes"] == 2
        sent = re.findall(r"([\d.]+) MB of weights sent in [\d.]+ s(.*)", server.log())
        assert float(sent[0][0]) > 10 and sent[0][1] == ""  # the first start streamed the slice
        assert float(sent[-1][0]) == 0.0 and "MB from its slice cache" in sent[-1][1]
        r = server.post("/v1/chat/completions", {"messages": QUESTION, "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        if server is not None:
            server.stop()
        worker.stop()


def _two_at_once(server: ApiServer) -> list[str]:
    """The replies to two chat requests sent at the same time (temperature 0)."""
    questions = ["What is the capital of France?", "Name three colours of the rainbow."]
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        body = {"messages": [{"role": "user", "content": questions[i]}], "temperature": 0, "max_tokens": 16}
        r = server.post("/v1/chat/completions", body, timeout=300)
        assert r.status_code == 200, r.text
        replies[i] = r.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(replies) == [0, 1]
    return [replies[0], replies[1]]


def _slots(server: ApiServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(re.search(r"^dllama_slots_total (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_parallel_requests_in_a_cluster_equal_one_node(tmp_path):
    args = ["--parallel", "2", "--max-seq-len", "256"]
    single = ApiServer(args, tmp_path / "single.log")
    try:
        single.wait_health(200)
        want = _two_at_once(single)
    finally:
        single.stop()
    worker = Worker(0, tmp_path / "worker.log")
    server = None
    try:
        server = ApiServer(
            [*args, "--workers", f"127.0.0.1:{worker.port}", "--split", "1,1"], tmp_path / "s.log"
        )
        assert server.wait_health(200)["nodes"] == 2
        assert _slots(server) == 2
        got = _two_at_once(server)
    finally:
        if server is not None:
            server.stop()
        worker.stop()
    assert got == want
    assert "Paris" in got[0]
