"""The embedded SmolLM2-135M on the Vulkan backend against the golden HF-transformers outputs, and the host
memory a Vulkan run takes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from golden_checks import QWEN25, check_greedy_prefix, check_last_logits, check_perplexity

from engine.model_file import open_model
from engine.runner import Runner
from engine.tokenizer import tokenizer_from_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["f32", "q80"])
def runner(request, smollm2, vk):
    return Runner(smollm2, vk, request.param, max_seq_len=512)


def test_last_logits(golden, runner):
    check_last_logits(golden, runner)


def test_perplexity(golden, runner, smollm2, shared):
    check_perplexity(
        golden, runner, tokenizer_from_gguf(smollm2.metadata), (shared / "ppl_text.txt").read_text()
    )


# ---- Qwen2.5-Coder-0.5B (qwen2: biases, NeoX RoPE; Q5_0/Q8_0/Q4_K/Q6_K) ----


@pytest.fixture(scope="module")
def qwen25(qwen25_path):
    return open_model(qwen25_path)


@pytest.fixture(scope="module")
def qwen_f32(qwen25, vk):
    return Runner(qwen25, vk, "f32", max_seq_len=256)


@pytest.fixture(scope="module", params=["f32", "q80"])
def qwen_runner(request, qwen25, qwen_f32, vk):
    return qwen_f32 if request.param == "f32" else Runner(qwen25, vk, "q80", max_seq_len=256)


def test_qwen25_last_logits(qwen25_golden, qwen_runner):
    check_last_logits(qwen25_golden, qwen_runner, QWEN25)


def test_qwen25_perplexity(qwen25_golden, qwen_runner, qwen25_tokenizer):
    text = qwen25_golden[0]["perplexity"]["text"]
    check_perplexity(qwen25_golden, qwen_runner, qwen25_tokenizer, text, QWEN25)


def test_qwen25_greedy_prefix(qwen25_golden, qwen_f32, qwen25_tokenizer):
    check_greedy_prefix(qwen25_golden, qwen_f32, qwen25_tokenizer)


def _resident(path: str) -> int:
    """Bytes of the file at `path` resident in this process's mappings of it."""
    total = 0
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        if block.split("\n")[0].endswith(path):
            m = re.search(r"^Rss:\s+(\d+) kB", block, re.M)
            total += int(m.group(1)) * 1024 if m else 0
    return total


def test_weights_leave_host_memory(smollm2_path, vk):
    """Uploading touches every weight page of the file, and then lets go of them: no second host copy."""
    path = str(Path(smollm2_path).resolve())
    model = open_model(smollm2_path)
    before = _resident(path)
    Runner(model, vk, "f32", max_seq_len=64)
    grown = _resident(path) - before
    assert grown < 0.02 * model.file_size, f"{grown / 2**20:.1f} MiB of weights still resident"


PEAK_PROBE = """
import resource
from engine.loader import make_backend
from engine.model_file import open_model
from engine.runner import Runner
from engine.tokenizer import tokenizer_from_gguf
be = make_backend("vulkan", None)
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = open_model({path!r})
runner = Runner(model, be, "f32", max_seq_len=1024)
runner.forward(list(range(1, 33)), 0)
for pos in range(32, 48):
    runner.forward([7], pos)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK", idle, peak, runner.program.device_bytes, int(be.device.is_cpu))
"""


def test_peak_host_memory_of_a_vulkan_run(smollm2_path):
    """A load and 48 positions add at most half the model file to host memory besides the device buffers.

    On lavapipe "device" buffers are host memory, so they are taken out; on a GPU they are not in RSS at all.
    A second host copy of the weights would add the whole file and fail this; without one, peak RSS of a
    Vulkan run stays under 2x the model file wherever the idle process (interpreter, driver) is smaller.
    """
    r = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE.format(path=str(smollm2_path))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    idle, peak, device, on_host = map(int, r.stdout.rsplit("PEAK", 1)[1].split())
    extra = peak - idle - device * on_host
    assert extra <= 0.5 * Path(smollm2_path).stat().st_size, f"{extra / 2**20:.0f} MiB beyond device buffers"
