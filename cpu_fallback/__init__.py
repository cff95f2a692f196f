"""CPU backend: numba kernels for every op of the compute graph."""

import os

# OpenMP worker threads wait between parallel regions by spinning GOMP_SPINCOUNT times, then sleeping. On
# idle cores a short spin makes a parallel launch cheap: 2-thread SmolLM2 decode ran at ~180 tokens/s with
# 1000 spins against ~70 with passive waiting (waking a sleeping thread cost ~40 µs per launch on this VM) and
# ~120 on one thread. Beside another busy program a helper thread costs more than it brings (66 tokens/s with
# 1000 spins, ~105 passive), so cpu_fallback/threads.py runs each single-node decode step on all threads or on
# one, whichever it measures faster (~93 there). Set before numba loads its OpenMP runtime (at the first
# parallel launch); a GOMP_SPINCOUNT in the environment still wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
