"""GET /v1/cluster, the web chat's status source: the model, its nodes, the slot and the token counts."""

from __future__ import annotations

import httpx


def test_cluster_status_follows_a_request(api):
    r = httpx.get(api.url + "/v1/cluster", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert body["context_length"] == 4096
    (node,) = body["nodes"]
    assert node["node"] == 0 and node["role"] == "root" and node["backend"] == "cpu"
    assert node["device"].startswith("CPU (numba")
    assert body["slots"] == {"total": 4, "used": 0, "waiting": 0}  # --parallel defaults to 4 on a CPU
    hi = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    reply = api.post("/v1/chat/completions", hi).json()
    after = httpx.get(api.url + "/v1/cluster", timeout=10).json()
    assert after["generated_tokens"] == body["generated_tokens"] + reply["usage"]["completion_tokens"]
    assert after["last_tokens_per_second"] > 0
