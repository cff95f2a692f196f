"""CPU backend: numba kernels for every op of the compute graph."""
