#!/usr/bin/env bash
# The prepared check for a machine with a GPU (issue 15): tools/gpu_check.sh OUT_DIR [--budget S] [--steps N].
# Runs with no network: Python packages the machine lacks come from wheels carried in .whl/ (installed into
# /tmp/site), a Vulkan loader from Debian packages carried in .gl/ (both optional; see docs/BENCHMARKS.md for
# how to fetch them). Without a project venv it uses the machine's python3 (>= 3.11, numpy 1 or 2).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--budget SECONDS] [--steps N]}
shift
if [ -d .gl ] && ! { ldconfig -p | grep -q libvulkan.so.1 && ldconfig -p | grep -q libfmt.so.9; }; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" tools/gpu_check.py "$OUT" "$@"
