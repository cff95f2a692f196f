"""The command line on the Vulkan backend: the same greedy tokens as the CPU backend on the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ["--prompt", "The capital of France is", "--steps", "8", "--temperature", "0", "--ignore-eos"]


def _dllama(out: Path, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, *PROMPT, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()) | {"stdout": r.stdout}


@pytest.mark.slow
def test_vulkan_generates_the_cpu_tokens(tmp_path):
    vk = _dllama(tmp_path / "vk.json", "--backend", "vulkan", "inference")
    cpu = _dllama(tmp_path / "cpu.json", "inference", "--backend", "cpu")
    assert len(vk["generated_ids"]) == 8
    assert vk["generated_ids"] == cpu["generated_ids"]
    assert vk["backend"].startswith("Vulkan ") and "🧠 Backend Vulkan" in vk["stdout"]
    assert vk["stdout"].count("🔶 Pred") == 8


def test_auto_says_what_it_chose(tmp_path, vk):
    model = write_tiny_gguf(tmp_path / "t.gguf")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "--backend",
            "auto",
            "perplexity",
            "--model",
            str(model),
            "--prompt",
            "to be or not",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    if vk.device.is_cpu:  # lavapipe: a CPU implementation of Vulkan is not worth it, the CPU backend runs
        assert f"--backend auto found only CPU implementations of Vulkan ({vk.device.name})" in r.stdout
        assert "🧠 Backend CPU" in r.stdout
    else:
        assert f"--backend auto chose Vulkan device {vk.device.index}" in r.stdout
        assert "🧠 Backend Vulkan" in r.stdout
