"""The `dllama` command line end to end, in subprocesses: outputs, --json, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]


def dllama(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        input=stdin,
        text=True,
        capture_output=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", wtype="q40", dim=64, hidden_dim=96)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_inference_json(tiny, tmp_path):
    out = tmp_path / "r.json"
    r = dllama(
        "--backend",
        "cpu",
        "inference",
        "--model",
        str(tiny),
        "--prompt",
        "hello",
        "--steps",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--nthreads",
        "1",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for key in (
        "prompt_ids",
        "generated_ids",
        "text",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "decode_gbytes_per_s",
    ):
        assert key in res
    assert len(res["generated_ids"]) == 6
    # end to end (wall clock, sampling and detokenising included) is never faster than the passes alone
    assert 0 < res["decode_tokens_per_s"] <= res["decode_forward_tokens_per_s"]
    assert 0 < res["prefill_tokens_per_s"] <= res["prefill_forward_tokens_per_s"]
    assert res["decode_wall_s"] == pytest.approx(5 / res["decode_tokens_per_s"])  # 5 gaps between 6 tokens
    assert res["first_token_s"] == pytest.approx(res["prefill_tokens"] / res["prefill_tokens_per_s"])
    assert res["sample_ms_per_token"] >= 0 and res["decode_exchanges_per_token"] == 0
    assert "end to end" in r.stdout and "forward" in r.stdout and "sampling:" in r.stdout
    assert res["prompt_ids"] == [ord(c) for c in "hello"] or len(res["prompt_ids"]) == 5
    assert r.stdout.count("🔶 Pred") == 6 and "🔷️ Eval" in r.stdout
    assert "tokens/s" in r.stdout and "GB/s" in r.stdout
    # greedy is deterministic: the same run gives the same tokens; --backend after the command works too
    r2 = dllama(
        "inference",
        "--backend",
        "cpu",
        "--model",
        str(tiny),
        "--prompt",
        "hello",
        "--steps",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        str(out),
    )
    assert r2.returncode == 0 and json.loads(out.read_text())["generated_ids"] == res["generated_ids"]


def test_perplexity_json(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox")
    out = tmp_path / "p.json"
    r = dllama("perplexity", "--model", str(tiny), "--file", str(text), "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n_scored"] == res["n_tokens"] - 1 > 0
    assert res["perplexity"] == pytest.approx(2.718281828 ** -res["avg_logprob"], rel=1e-9)
    assert 0 < res["tokens_per_s"] <= res["forward_tokens_per_s"]


def test_chat_reads_turns_until_eof(tiny):
    r = dllama(
        "chat",
        "--model",
        str(tiny),
        "--system",
        "be brief",
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        stdin="hi\nand again\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("🤖 Assistant") == 2


@pytest.mark.parametrize(
    "args, needles",
    [
        (["inference", "--prompt", "x", "--steps", "-1"], ["--steps"]),
        (["--backend", "metal", "inference", "--prompt", "x"], ["unknown backend", "metal"]),
        (["inference", "--prompt", "x", "--buffer-float-type", "q7"], ["buffer-float-type", "q7"]),
        (["inference", "--prompt", "x", "--kv-cache-type", "q8"], ["kv-cache-type", "q8", "f32, f16"]),
        (["inference", "--prompt", "x", "--model", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf"]),
        (["inference", "--prompt", "x", "--bogus-flag", "1"], ["bogus-flag"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needles):
    assert_one_line_error(dllama(*args), *needles)


def test_bad_files_are_one_line_exit_2(tiny, tmp_path):
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    assert_one_line_error(dllama("inference", "--prompt", "x", "--model", str(truncated)), str(truncated))
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    assert_one_line_error(dllama("inference", "--prompt", "x", "--model", str(foreign)), str(foreign))
    # a tokenizer with more tokens than the model has rows
    big = write_tiny_gguf(tmp_path / "big.gguf", vocab=320)
    small = write_tiny_gguf(tmp_path / "small.gguf", vocab=288)
    assert_one_line_error(
        dllama("inference", "--prompt", "x", "--model", str(small), "--tokenizer", str(big)), "tokenizer"
    )


RSS_PROBE = """
import resource, sys
{body}
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(body: str) -> int:
    r = subprocess.run(
        [sys.executable, "-c", RSS_PROBE.format(body=body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.rsplit("MAXRSS", 1)[1])


@pytest.mark.slow
def test_memory_stays_within_weights_plus_kv_cache(smollm2_path):
    """Peak RSS beyond an idle interpreter with the engine imported <= file size + KV cache + 100 MB."""
    idle = _peak_rss("import engine.cli, engine.loader, cpu_fallback.backend, cpu_fallback.kernels")
    seq = 1024
    run = _peak_rss(
        "from engine.cli import main\n"
        "try:\n"
        f"    main(['inference', '--prompt', 'Hello there', '--steps', '16', '--max-seq-len', '{seq}'])\n"
        "except SystemExit:\n"
        "    pass"
    )
    kv = 2 * 30 * seq * 192 * 4  # layers x K and V x positions x kv_dim x float32 (notes/models.md shapes)
    assert run - idle <= smollm2_path.stat().st_size + kv + 100 * 2**20, (run - idle) / 2**20


def test_end_to_end_rates_count_sampling_and_forward_rates_do_not(tiny):
    """A sampler that takes 20 ms a draw: the wall-clock figures hold every draw, the forward ones none."""
    import time

    from engine.generate import Metrics, generate
    from engine.loader import load
    from engine.sampler import Sampler

    class SlowSampler(Sampler):
        def sample(self, logits):
            time.sleep(0.02)
            return super().sample(logits)

    loaded = load(str(tiny), None, "cpu", n_threads=1, max_seq_len=32)
    m = Metrics()
    sampler = SlowSampler(loaded.tokenizer.vocab_size, temperature=0)
    list(generate(loaded.runner, loaded.tokenizer, [1, 2, 3], 5, sampler, stop_at_eos=False, metrics=m))
    assert len(m.generated) == 5 and m.decode.n_tokens == 4
    assert m.sample_s >= 5 * 0.02 and m.decode_wall_s >= 4 * 0.02
    assert m.first_token_s >= 0.02 + m.prefill.eval_s
    assert m.decode_rate() == 4 / m.decode_wall_s <= 1 / 0.02
    assert Metrics.rate(m.decode) == 4 / (m.decode.eval_s + m.decode.sync_s) > m.decode_rate()
