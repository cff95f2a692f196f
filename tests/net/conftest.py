"""Fixtures of the cluster tests: a session-wide pool of worker processes (all killed at the end) and the
8-KV-head tiny model in every weight type."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # netutil imports by plain name, like tests/*.py

from netutil import TINY8, WorkerPool  # noqa: E402
from tinymodel import write_tiny_gguf  # noqa: E402


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
