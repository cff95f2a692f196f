"""Vulkan device discovery through the loader itself (ctypes), before Kompute is imported.

Kompute exposes neither the device type, the API version nor subgroup and memory properties, and importing
it fails outright on a machine without a Vulkan loader; this module answers those questions with clear errors.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from engine.errors import DllamaError

LOADER = "libvulkan.so.1"
DEVICE_TYPES = {0: "other", 1: "integrated GPU", 2: "discrete GPU", 3: "virtual GPU", 4: "CPU"}
API_1_2 = (1 << 22) | (2 << 12)
_SUBGROUP_ARITHMETIC = 0x4
_SUBGROUP_BALLOT = 0x8
_STAGE_COMPUTE = 0x20
_HEAP_DEVICE_LOCAL = 0x1
_ST_APPLICATION_INFO = 0
_ST_INSTANCE_CREATE_INFO = 1
_ST_PROPERTIES_2 = 1000059001
_ST_SUBGROUP_PROPERTIES = 1000094000
_ST_FEATURES_2 = 1000059000
_ST_INTEGER_DOT_FEATURES = 1000280000
INTEGER_DOT_EXTENSION = b"VK_KHR_shader_integer_dot_product"
_VK_RESULTS = {
    -1: "out of host memory",
    -2: "out of device memory",
    -3: "initialization failed",
    -6: "a requested layer is not present",
    -7: "a requested extension is not present",
    -9: "no compatible Vulkan driver (ICD) was found",
}


@dataclass(frozen=True)
class DeviceInfo:
    """What the backend needs to know about one physical device."""

    index: int
    name: str
    kind: str  # one of DEVICE_TYPES' values
    api_version: int
    max_storage_buffer_range: int
    max_shared_memory: int
    max_workgroup_invocations: int
    subgroup_size: int
    subgroup_arithmetic: bool
    subgroup_ballot: bool
    device_local_bytes: int
    integer_dot: bool = False  # VK_KHR_shader_integer_dot_product with shaderIntegerDotProduct

    @property
    def is_cpu(self) -> bool:
        return self.kind == "CPU"

    @property
    def api(self) -> str:
        v = self.api_version
        return f"{v >> 22}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"

    def describe(self) -> str:
        """One line for the user: name, type, API version, memory; 'CPU emulation' for software drivers."""
        kind = "CPU emulation" if self.is_cpu else self.kind
        return (
            f"Vulkan device {self.index}: {self.name} ({kind}, Vulkan {self.api}, "
            f"{self.device_local_bytes / 2**30:.1f} GiB device-local)"
        )


class _AppInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("pApplicationName", ctypes.c_char_p),
        ("applicationVersion", ctypes.c_uint32),
        ("pEngineName", ctypes.c_char_p),
        ("engineVersion", ctypes.c_uint32),
        ("apiVersion", ctypes.c_uint32),
    ]


class _InstanceInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("flags", ctypes.c_uint32),
        ("pApplicationInfo", ctypes.POINTER(_AppInfo)),
        ("enabledLayerCount", ctypes.c_uint32),
        ("ppEnabledLayerNames", ctypes.c_void_p),
        ("enabledExtensionCount", ctypes.c_uint32),
        ("ppEnabledExtensionNames", ctypes.c_void_p),
    ]


class _Limits(ctypes.Structure):
    """The leading fields of VkPhysicalDeviceLimits, up to the compute limits."""

    _fields_ = (
        [
            (n, ctypes.c_uint32)
            for n in (
                "maxImageDimension1D",
                "maxImageDimension2D",
                "maxImageDimension3D",
                "maxImageDimensionCube",
                "maxImageArrayLayers",
                "maxTexelBufferElements",
                "maxUniformBufferRange",
                "maxStorageBufferRange",
                "maxPushConstantsSize",
                "maxMemoryAllocationCount",
                "maxSamplerAllocationCount",
            )
        ]
        + [("bufferImageGranularity", ctypes.c_uint64), ("sparseAddressSpaceSize", ctypes.c_uint64)]
        + [(f"u{i}", ctypes.c_uint32) for i in range(38)]  # descriptor, vertex ... fragment limits
        + [
            ("maxComputeSharedMemorySize", ctypes.c_uint32),
            ("maxComputeWorkGroupCount", ctypes.c_uint32 * 3),
            ("maxComputeWorkGroupInvocations", ctypes.c_uint32),
            ("maxComputeWorkGroupSize", ctypes.c_uint32 * 3),
        ]
    )


class _Properties2(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("apiVersion", ctypes.c_uint32),
        ("driverVersion", ctypes.c_uint32),
        ("vendorID", ctypes.c_uint32),
        ("deviceID", ctypes.c_uint32),
        ("deviceType", ctypes.c_int),
        ("deviceName", ctypes.c_char * 256),
        ("pipelineCacheUUID", ctypes.c_uint8 * 16),
        ("limits", _Limits),
        ("rest", ctypes.c_uint8 * 1024),
    ]  # the remaining limits and sparse properties


class _SubgroupProperties(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("subgroupSize", ctypes.c_uint32),
        ("supportedStages", ctypes.c_uint32),
        ("supportedOperations", ctypes.c_uint32),
        ("quadOperationsInAllStages", ctypes.c_uint32),
    ]


class _Features2(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("features", ctypes.c_uint32 * 55),  # VkPhysicalDeviceFeatures: 55 VkBool32
    ]


class _IntegerDotFeatures(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_int),
        ("pNext", ctypes.c_void_p),
        ("shaderIntegerDotProduct", ctypes.c_uint32),
    ]


class _ExtensionProperties(ctypes.Structure):
    _fields_ = [("extensionName", ctypes.c_char * 256), ("specVersion", ctypes.c_uint32)]


class _MemoryHeap(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("flags", ctypes.c_uint32)]


class _MemoryProperties(ctypes.Structure):
    _fields_ = [
        ("memoryTypeCount", ctypes.c_uint32),
        ("memoryTypes", ctypes.c_uint32 * 64),
        ("memoryHeapCount", ctypes.c_uint32),
        ("memoryHeaps", _MemoryHeap * 16),
    ]


def _loader(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name)
    except OSError:
        raise DllamaError(
            f"no Vulkan loader: {name} was not found (install libvulkan1 and a Vulkan driver, e.g. "
            "mesa-vulkan-drivers; or use --backend cpu)"
        ) from None


def list_devices(loader: str = LOADER) -> list[DeviceInfo]:
    """Every physical device the Vulkan loader reports, in its order (the order Kompute's indices use)."""
    vk = _loader(loader)
    app = _AppInfo(_ST_APPLICATION_INFO, None, b"dllama", 1, b"dllama", 1, API_1_2)
    info = _InstanceInfo(_ST_INSTANCE_CREATE_INFO, None, 0, ctypes.pointer(app), 0, None, 0, None)
    instance = ctypes.c_void_p()
    res = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
    if res != 0:
        why = _VK_RESULTS.get(res, f"error {res}")
        raise DllamaError(f"cannot open Vulkan: {why} (is a Vulkan driver installed? or use --backend cpu)")
    try:
        count = ctypes.c_uint32()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ctypes.c_void_p * count.value)()
        vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        return [_describe(vk, i, ctypes.c_void_p(h)) for i, h in enumerate(handles[: count.value])]
    finally:
        vk.vkDestroyInstance(instance, None)


def _integer_dot(vk: ctypes.CDLL, handle: ctypes.c_void_p) -> bool:
    """Whether the device has VK_KHR_shader_integer_dot_product and its shaderIntegerDotProduct feature
    (what the patched kp then enables, so that the INT_DOT matmul shaders may run)."""
    count = ctypes.c_uint32()
    vk.vkEnumerateDeviceExtensionProperties(handle, None, ctypes.byref(count), None)
    exts = (_ExtensionProperties * count.value)()
    vk.vkEnumerateDeviceExtensionProperties(handle, None, ctypes.byref(count), exts)
    if INTEGER_DOT_EXTENSION not in {e.extensionName for e in exts[: count.value]}:
        return False
    dot = _IntegerDotFeatures(_ST_INTEGER_DOT_FEATURES, None, 0)
    features = _Features2(_ST_FEATURES_2, ctypes.cast(ctypes.pointer(dot), ctypes.c_void_p))
    vk.vkGetPhysicalDeviceFeatures2(handle, ctypes.byref(features))
    return bool(dot.shaderIntegerDotProduct)


def _describe(vk: ctypes.CDLL, index: int, handle: ctypes.c_void_p) -> DeviceInfo:
    sub = _SubgroupProperties(_ST_SUBGROUP_PROPERTIES, None)
    props = _Properties2(_ST_PROPERTIES_2, ctypes.cast(ctypes.pointer(sub), ctypes.c_void_p))
    vk.vkGetPhysicalDeviceProperties2(handle, ctypes.byref(props))
    mem = _MemoryProperties()
    vk.vkGetPhysicalDeviceMemoryProperties(handle, ctypes.byref(mem))
    local = [
        mem.memoryHeaps[i].size
        for i in range(mem.memoryHeapCount)
        if mem.memoryHeaps[i].flags & _HEAP_DEVICE_LOCAL
    ]
    lim = props.limits
    compute = sub.supportedStages & _STAGE_COMPUTE
    return DeviceInfo(
        index=index,
        name=props.deviceName.decode(errors="replace"),
        kind=DEVICE_TYPES.get(props.deviceType, "other"),
        api_version=props.apiVersion,
        max_storage_buffer_range=lim.maxStorageBufferRange,
        max_shared_memory=lim.maxComputeSharedMemorySize,
        max_workgroup_invocations=lim.maxComputeWorkGroupInvocations,
        subgroup_size=sub.subgroupSize,
        subgroup_arithmetic=bool(sub.supportedOperations & _SUBGROUP_ARITHMETIC and compute),
        subgroup_ballot=bool(sub.supportedOperations & _SUBGROUP_BALLOT and compute),
        device_local_bytes=max(local, default=0),
        integer_dot=_integer_dot(vk, handle),
    )


def check_device(dev: DeviceInfo, largest_buffer: int) -> None:
    """Refuse, in one line, a device that lacks what the shaders need."""
    if dev.api_version < API_1_2:
        raise DllamaError(
            f"{dev.name} supports Vulkan {dev.api} but the shaders need Vulkan 1.2 (SPIR-V 1.5)"
        )
    if dev.max_workgroup_invocations < 128:
        raise DllamaError(
            f"{dev.name} allows only {dev.max_workgroup_invocations} invocations per workgroup "
            "(the shaders need 128)"
        )
    if dev.max_shared_memory < 16384:
        raise DllamaError(f"{dev.name} has only {dev.max_shared_memory} bytes of shared memory (need 16384)")
    if largest_buffer > dev.max_storage_buffer_range:
        raise DllamaError(
            f"{dev.name} cannot bind a {largest_buffer / 2**20:.0f} MiB buffer "
            f"(maxStorageBufferRange {dev.max_storage_buffer_range / 2**20:.0f} MiB): "
            "use a smaller model, more nodes, or --backend cpu"
        )


def pick_device(devices: list[DeviceInfo], index: int | None) -> DeviceInfo:
    """The device `--gpu-index` names, or the first one; a clear error when there is none."""
    if not devices:
        raise DllamaError(
            "Vulkan found no device: install a driver (e.g. mesa-vulkan-drivers) or use --backend cpu"
        )
    if index is None:
        return devices[0]
    if not 0 <= index < len(devices):
        names = "; ".join(f"{d.index}: {d.name}" for d in devices)
        raise DllamaError(f"--gpu-index {index} does not exist: the Vulkan devices are {names}")
    return devices[index]
