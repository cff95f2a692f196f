"""Synchronisation under the Khronos validation layer (synchronization validation on): a full forward pass,
prefill batches and decode steps (and rows of two KV slots), in every tuning and activation type, and
dispatch pairs that conflict in each way (the backend's barrier placement): zero hazards, zero errors (a
shader capability such as the INT_DOT matmuls' integer dot products used without its device feature enabled
is an error too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tinymodel import write_tiny_gguf

from shaders.devices import list_devices

HERE = Path(__file__).resolve().parent
SETTINGS = """khronos_validation.report_flags = error,warn,perf
khronos_validation.debug_action = VK_DBG_LAYER_ACTION_LOG_MSG
khronos_validation.log_filename = stdout
khronos_validation.enables = VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT
"""


def test_forward_passes_are_hazard_free(tmp_path):
    model = write_tiny_gguf(
        tmp_path / "tiny.gguf", wtype="q41", dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2
    )
    (tmp_path / "vk_layer_settings.txt").write_text(SETTINGS)
    env = dict(
        os.environ,
        VK_INSTANCE_LAYERS="VK_LAYER_KHRONOS_validation",
        VK_LAYER_SETTINGS_PATH=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    r = subprocess.run(
        [sys.executable, str(HERE / "vk_sync_script.py"), str(model)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=HERE.parents[1],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    engine, _, control = r.stdout.partition("=== CONTROL ===")
    assert engine.count("ran Vulkan") == 8, r.stdout[-3000:]
    assert engine.count("slots ran on Vulkan") == 2, r.stdout[-3000:]
    assert engine.count("ran conflict pair") == 4, r.stdout[-3000:]
    if list_devices()[0].integer_dot:  # the q41 model's Q80 matmuls ran the INT_DOT shaders (lavapipe)
        assert engine.count("integer dot products) q80") == 4, r.stdout[-3000:]
    # the layer is live: the deliberate write-after-write between two copies is reported
    assert "SYNC-HAZARD-WRITE-AFTER-WRITE" in control, (
        "the validation layer reported nothing: is it installed?"
    )
    reports = [ln for ln in engine.splitlines() if "Validation" in ln or "SYNC-HAZARD" in ln or "VUID" in ln]
    assert reports == [], "\n".join(reports[:10])
