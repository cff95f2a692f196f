"""CPU backend: numba kernels for every op of the compute graph."""

import os

# OpenMP worker threads spin between parallel regions by default. On an idle machine spinning is faster
# (2-thread SmolLM2 decode ~63 instead of ~50 tokens/s: a passive wake-up costs ~13 µs per parallel launch),
# but when other processes share the cores a spinning thread takes their turns: one parallel launch cost
# ~20 µs passive against 70 µs (GOMP_SPINCOUNT=1000), 0.6 ms (10000) and 1.4 ms (active) at a load of 4.5
# here, and decode collapsed from ~45 to ~14 tokens/s. Passive waiting degrades gracefully, so it is the
# default, and the backend keeps parallel launches few instead (4 per layer in decode). numba's dynamic
# scheduling (set_parallel_chunksize) collapsed the same way under load. Set before numba loads its OpenMP
# runtime (at the first parallel launch); OMP_WAIT_POLICY=ACTIVE in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
