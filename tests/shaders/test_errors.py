"""Clear one-line errors: shaders that do not compile, no loader or device, missing features, memory."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import write_tiny_gguf

import shaders.backend
from engine.errors import DllamaError
from engine.model_file import open_model
from engine.runner import Runner
from shaders.compile import spirv
from shaders.devices import check_device, list_devices

ROOT = Path(__file__).resolve().parents[2]


def test_compile_error_names_shader_and_line(tmp_path):
    (tmp_path / "broken.comp").write_text(
        "#version 450\nlayout(local_size_x = 1) in;\nvoid main() {\n    float x = 1.0;\n    x = y;\n}\n"
    )
    with pytest.raises(
        DllamaError, match=r"shader broken does not compile: broken\.comp:5: 'y' : undeclared"
    ):
        spirv("broken", source_dir=tmp_path)


def test_compile_error_in_an_included_file(tmp_path):
    (tmp_path / "helper.glsl").write_text("// helper\nfloat twice(float v) { return 2.0 * v }\n")
    (tmp_path / "user.comp").write_text(
        '#version 450\n#extension GL_GOOGLE_include_directive : require\n#include "helper.glsl"\n'
        "layout(local_size_x = 1) in;\nvoid main() {}\n"
    )
    with pytest.raises(DllamaError, match=r"shader user does not compile: helper\.glsl:2:"):
        spirv("user", source_dir=tmp_path)


def test_compiled_shaders_are_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(shaders.compile, "cache_dir", lambda: tmp_path / "cache")
    code = spirv("silu_mul")
    assert code[:4] == b"\x03\x02\x23\x07"  # the SPIR-V magic number
    assert len(list((tmp_path / "cache").glob("silu_mul-*.spv"))) == 1
    monkeypatch.setattr(shaders.compile, "glslang", lambda: pytest.fail("compiled again instead of cached"))
    assert spirv("silu_mul") == code


def test_no_vulkan_loader():
    with pytest.raises(DllamaError, match="no Vulkan loader: libvulkan-absent.so.1 was not found"):
        list_devices("libvulkan-absent.so.1")


def _dllama(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, **env),
    )


def test_no_vulkan_device_is_one_line(tmp_path):
    model = write_tiny_gguf(tmp_path / "t.gguf")
    r = _dllama(
        "--backend",
        "vulkan",
        "inference",
        "--model",
        str(model),
        "--prompt",
        "hi",
        "--steps",
        "1",
        VK_ICD_FILENAMES=str(tmp_path / "no-driver.json"),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no compatible Vulkan driver (ICD) was found" in lines[0]
    auto = _dllama(
        "inference",
        "--backend",
        "auto",
        "--model",
        str(model),
        "--prompt",
        "hi",
        "--steps",
        "1",
        VK_ICD_FILENAMES=str(tmp_path / "no-driver.json"),
    )
    assert auto.returncode == 0, auto.stderr
    assert "--backend auto found no Vulkan device: using the CPU backend" in auto.stdout


def test_old_vulkan_is_refused(vk):
    old = dataclasses.replace(vk.device, api_version=(1 << 22) | (1 << 12))
    with pytest.raises(DllamaError, match=r"supports Vulkan 1\.1\.0 but the shaders need Vulkan 1\.2"):
        check_device(old, 0)


def test_forced_subgroups_need_subgroup_arithmetic(vk, monkeypatch):
    plain = dataclasses.replace(vk.device, subgroup_arithmetic=False)
    monkeypatch.setattr(shaders.backend, "list_devices", lambda: [plain])
    with pytest.raises(DllamaError, match="lacks subgroup arithmetic"):
        shaders.backend.VulkanBackend(subgroups=True)
    assert not shaders.backend.VulkanBackend().subgroups  # by default such a device gets the fallback


def test_model_larger_than_device_memory(tmp_path, vk, monkeypatch):
    """576 bytes per position (2 layers of f32 keys and values 2 x 16 wide, the RoPE table): 1.125x the
    device's memory; a second KV slot (--parallel 2) adds its 512 bytes per position to what is counted."""
    seq = vk.device.device_local_bytes // 1024 * 2
    model = open_model(write_tiny_gguf(tmp_path / "long.gguf", context=seq))
    monkeypatch.setattr("net.protocol.available_memory", lambda: 0)  # unknown: the host-memory check passes
    needs = []
    for n_slots in (1, 2):
        with pytest.raises(
            DllamaError, match=r"the model needs \d+ MiB of device memory but .* has \d+ MiB"
        ) as e:
            Runner(model, vk, max_seq_len=seq, n_slots=n_slots)
        needs.append(int(re.search(r"needs (\d+) MiB", str(e.value)).group(1)))
    assert abs(needs[1] - needs[0] - seq * 512 / 2**20) <= 1


def test_buffer_beyond_binding_range(tmp_path, vk):
    seq = vk.device.max_storage_buffer_range * 3 // 2 // (32 * 4)  # a layer's keys (2 x 16 f32): 1.5x range
    model = open_model(write_tiny_gguf(tmp_path / "long.gguf", context=seq))
    with pytest.raises(DllamaError, match=r"cannot bind a \d+ MiB buffer \(maxStorageBufferRange"):
        Runner(model, vk, max_seq_len=seq)


def test_bad_gpu_index_is_one_line(tmp_path):
    model = write_tiny_gguf(tmp_path / "t.gguf")
    r = _dllama(
        "--backend", "vulkan", "--gpu-index", "7", "perplexity", "--model", str(model), "--prompt", "a b"
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--gpu-index 7 does not exist: the Vulkan devices are 0: " in r.stderr
