# The two commands a person needs: `make run` (generation on the embedded model) and `make test`.
# Both do the whole set-up first (tools/setup.sh, idempotent and fast on a second run); `make test` also fetches
# Qwen2.5-Coder-0.5B once into the user cache (~/.cache/dllama, or $DLLAMA_CACHE), `make run` never downloads.
PROMPT ?= The capital of France is
STEPS ?= 64

.PHONY: run test setup models lint bench
setup:
	@bash tools/setup.sh

run: setup
	@.venv/bin/dllama inference --prompt "$(PROMPT)" --steps $(STEPS) --temperature 0

models: setup
	@.venv/bin/python -m engine.catalog qwen2.5-coder >/dev/null

test: models
	@.venv/bin/python -m pytest -q tests

lint: setup
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .

bench: setup
	@.venv/bin/python tools/bench_cpu.py
