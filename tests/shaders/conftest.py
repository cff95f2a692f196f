"""Vulkan test fixtures: backends on the machine's first Vulkan device (lavapipe in CI), in three tunings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vk_harness imports by plain name

from shaders.backend import Tuning, VulkanBackend  # noqa: E402

GPU_SPLIT = Tuning(split=True, rows=2, batch=2, reduce_wg=128)


@pytest.fixture(scope="session")
def vk() -> VulkanBackend:
    """The device's own tuning (on lavapipe: invocations own rows, x shared by subgroup broadcast)."""
    return VulkanBackend()


@pytest.fixture(scope="session")
def vk_gpu() -> VulkanBackend:
    """The GPU work split (workgroup-wide reductions) with subgroup arithmetic, whatever the device."""
    return VulkanBackend(subgroups=True, tuning=GPU_SPLIT)


@pytest.fixture(scope="session")
def vk_plain() -> VulkanBackend:
    """The GPU work split with the shared-memory reductions of devices without subgroup arithmetic."""
    return VulkanBackend(subgroups=False, tuning=GPU_SPLIT)


@pytest.fixture(scope="session", params=["device", "gpu-split", "shared-memory"])
def any_vk(request, vk, vk_gpu, vk_plain) -> VulkanBackend:
    return {"device": vk, "gpu-split": vk_gpu, "shared-memory": vk_plain}[request.param]
