#!/usr/bin/env bash
# Build the patched Kompute (kp) wheel for one Python: tools/build_kp.sh PYTHON WHEEL_DIR (idempotent; the
# wheel is cached in WHEEL_DIR, one per Python tag). PYTHON needs setuptools<70, wheel and cmake installed.
# kp 0.9.0's setup.py drops -DPYTHON_EXECUTABLE (a missing comma glues it to the previous argument), so CMake
# may pick whatever python3.x it finds on PATH; the build restores the comma first.
# tools/kp-0.9.0-dllama.patch makes dependent dispatches safe on real GPUs: OpAlgoDispatch takes `barrier`
# (C++ constructor argument and Python keyword, default true) and records one global shader/transfer-write ->
# compute barrier before the dispatch instead of kp's per-tensor transfer-only barrier, so the backend places
# barriers only where dispatches conflict. OpTensorSyncDevice/OpTensorSyncLocal take `bytes` (copy only the
# live rows), OpTensorSyncLocal's host-read barrier sits on the staging buffer the host reads, staging memory
# is host-cached where the device has such memory, a shader-write -> host-read barrier is added for host
# tensors, instances are Vulkan 1.2 (the shaders are SPIR-V 1.5), and Sequence.eval() releases the GIL while it
# waits on its fence (a cluster node's network threads run meanwhile). The Manager creates its device with
# VK_KHR_shader_integer_dot_product and the shaderIntegerDotProduct feature (a pNext feature chain) where the
# device has them, for the INT_DOT matmul shaders, and reports what it enabled (Manager.enabled_extensions,
# enabled_features). Validation layers are left to VK_INSTANCE_LAYERS, not always loaded.
# pybind11 comes from PyPI, pinned: before 2.12 it reads numpy's dtype struct directly, and under numpy 2 kp's
# Tensor.data() then returns arrays whose stride is 0 (every element aliasing the first).
# The wheel's version carries a hash of the patch, the build flags and pybind11's version, so changing any
# of them rebuilds it.
set -euo pipefail
PY=${1:?usage: tools/build_kp.sh PYTHON WHEEL_DIR}
WHEELS=${2:?usage: tools/build_kp.sh PYTHON WHEEL_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KP_FLAGS="KOMPUTE_OPT_INSTALL=OFF KOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER=OFF KOMPUTE_OPT_USE_BUILT_IN_FMT=OFF
KOMPUTE_OPT_USE_BUILT_IN_PYBIND11=OFF KOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON KOMPUTE_OPT_DISABLE_VK_DEBUG_LAYERS=ON"
KP_PATCH="$ROOT/tools/kp-0.9.0-dllama.patch"
PYBIND11="pybind11==2.13.6"
KP_VERSION="0.9.0+dllama.$( (cat "$KP_PATCH"; echo "$KP_FLAGS $PYBIND11") | sha256sum | cut -c1-12)"
TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
PIP="$PY -m pip"
if ! ls "$WHEELS"/kp-"$KP_VERSION"-"$TAG"-*.whl >/dev/null 2>&1; then
  echo "dllama set-up: building Kompute (kp $KP_VERSION, $TAG), about 2-4 minutes, cached in $WHEELS" >&2
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  mkdir -p "$WHEELS"
  $PIP download -q --disable-pip-version-check --no-deps --no-binary :all: kp==0.9.0 -d "$src"
  tar -xzf "$src"/kp-0.9.0.tar.gz -C "$src"
  sed -i "s/'-DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON'\$/'-DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON',/" \
    "$src/kp-0.9.0/setup.py"
  sed -i "s/version='0.9.0'/version='$KP_VERSION'/" "$src/kp-0.9.0/setup.py"
  patch -p1 --forward --quiet -d "$src/kp-0.9.0" < "$KP_PATCH"
  rm -f "$WHEELS"/kp-*-"$TAG"-*.whl
  $PIP install -q --disable-pip-version-check "$PYBIND11"
  CMAKE_PREFIX_PATH=$("$PY" -c 'import pathlib, pybind11; print(pathlib.Path(pybind11.get_cmake_dir()).parents[2])')
  export CMAKE_PREFIX_PATH
  env $KP_FLAGS KOMPUTE_PYTHON_NUM_PARALLEL_THREADS="$(nproc)" \
    $PIP wheel -q --disable-pip-version-check --no-build-isolation --no-deps "$src/kp-0.9.0" -w "$WHEELS"
fi
echo "$KP_VERSION"
