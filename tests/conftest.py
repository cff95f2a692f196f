"""Shared fixtures: the ../shared reference folder, its golden outputs, the embedded model, Qwen2.5-Coder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # test helper modules (tinymodel, reference) import by plain name

SHARED = TESTS.parent.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared/reference beside the checkout; tests that need it skip with the reason when it is absent."""
    ref = SHARED / "reference"
    if not ref.is_dir():
        pytest.skip(f"reference folder {ref} is absent (it lies beside the checkout in CI)")
    return ref


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from engine.catalog import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def qwen25_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct from the user cache, fetched through the catalogue if it is not there yet
    (`make test` fetches it before the tests start)."""
    from engine.catalog import resolve_model

    return resolve_model("qwen2.5-coder")


@pytest.fixture(scope="session")
def golden(shared: Path) -> tuple[dict, dict]:
    """The golden SmolLM2 outputs: (the json's cases and perplexity, the npz's prompt ids and logits)."""
    meta = json.loads((shared / "smollm2_golden.json").read_text())
    return meta, dict(np.load(shared / "smollm2_golden.npz"))


@pytest.fixture(scope="session")
def qwen25_tokenizer(qwen25_path: Path):
    """Qwen2.5-Coder's tokenizer from the file's metadata (the model itself is not loaded)."""
    from engine.gguf_file import read_gguf
    from engine.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(read_gguf(qwen25_path)[0])


@pytest.fixture(scope="session")
def qwen25_golden(shared: Path) -> tuple[dict, dict]:
    """The golden Qwen2.5-Coder outputs: (the json's cases and perplexity, the npz's ids and logits)."""
    meta = json.loads((shared / "qwen25_golden.json").read_text())
    return meta, dict(np.load(shared / "qwen25_golden.npz"))


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path):
    """The embedded model, opened once."""
    from engine.model_file import open_model

    return open_model(smollm2_path)
