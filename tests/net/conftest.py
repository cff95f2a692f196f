"""Fixtures of the cluster tests: a session-wide pool of worker processes (all killed at the end), the
8-KV-head tiny model in every weight type, the root's one-thread CPU backend and f32 tiny model, a Vulkan
backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # netutil imports by plain name, like tests/*.py

from netutil import TINY8, WorkerPool  # noqa: E402
from tinymodel import write_tiny_gguf  # noqa: E402

from cpu_fallback.backend import CpuBackend  # noqa: E402
from engine.errors import DllamaError  # noqa: E402
from engine.loader import make_backend  # noqa: E402
from engine.model_file import open_model  # noqa: E402


@pytest.fixture(scope="session")
def pool():
    p = WorkerPool()
    yield p
    p.close()


@pytest.fixture(scope="session")
def tiny8_paths(tmp_path_factory) -> dict[str, Path]:
    """The 8-KV-head tiny model in every weight type."""
    d = tmp_path_factory.mktemp("tiny8")
    return {
        wt: write_tiny_gguf(d / f"tiny8-{wt}.gguf", wtype=wt, seed=3, **TINY8)
        for wt in ("f32", "f16", "bf16", "q80", "q40", "q41")
    }


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    """The root's backend in the cluster tests: one CPU thread (workers are separate processes)."""
    return CpuBackend(1)


@pytest.fixture(scope="module")
def model(tiny8_paths):
    """The f32 8-KV-head tiny model, opened."""
    return open_model(tiny8_paths["f32"])


@pytest.fixture(scope="module")
def vulkan():
    """A Vulkan backend (lavapipe in CI); skips the test where no device is usable."""
    try:
        return make_backend("vulkan", None)
    except DllamaError as e:
        pytest.skip(f"no usable Vulkan device: {e}")
