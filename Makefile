# The two commands a person needs: `make run` (generation on the embedded model) and `make test`.
# Both do the whole set-up first (tools/setup.sh, idempotent and fast on a second run).
PROMPT ?= The capital of France is
STEPS ?= 64

.PHONY: run test setup lint bench
setup:
	@bash tools/setup.sh

run: setup
	@.venv/bin/dllama inference --prompt "$(PROMPT)" --steps $(STEPS) --temperature 0

test: setup
	@.venv/bin/python -m pytest -q tests

lint: setup
	@.venv/bin/ruff check .

bench: setup
	@.venv/bin/python tools/bench_cpu.py
