"""Shared fixtures: the ../shared reference folder and the embedded model."""

from __future__ import annotations

import sys
from pathlib import Path

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
    from engine.embedded import embedded_model_path

    return embedded_model_path()
