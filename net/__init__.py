"""Network layer for tensor-parallel clusters (root <-> workers)."""
