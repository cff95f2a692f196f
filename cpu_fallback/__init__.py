"""CPU backend: numba kernels for every op of the compute graph."""

import os

# OpenMP worker threads spin between parallel regions by default; when another process shares the cores that
# spinning collapsed 2-thread decode from ~45 to ~14 tokens/s here. Passive waiting measured no slower on a
# quieter machine. It must be set before numba loads its OpenMP runtime (at the first parallel launch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
