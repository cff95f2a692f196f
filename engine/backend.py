"""The one small interface every backend (CPU/numba, Vulkan/Kompute) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from engine.graph import Graph
from engine.weights import Weight


class Program(ABC):
    """A graph made runnable on one backend: buffers allocated, weights resident, KV cache in place."""

    kv_cache_bytes: int  # what the K and V caches of every layer take in the backend's memory

    @abstractmethod
    def pipe(self, name: str) -> np.ndarray:
        """Host view (max_batch rows) of a buffer the runner or network uses: tok, pos, slot, x, zq,
        logits (x and zq only in a cluster: on one node a backend may keep them device-only)."""

    @abstractmethod
    def run_segment(self, index: int, n_tokens: int) -> None:
        """Run the ops of segment `index` on the first `n_tokens` rows; pipes are host-coherent on return."""

    def run_segments(self, start: int, stop: int, n_tokens: int) -> None:
        """Run segments start..stop-1 with no host step between them (one node, no network); a backend may
        submit them as one unit of work. Pipes are host-coherent on return."""
        for index in range(start, stop):
            self.run_segment(index, n_tokens)

    def copy_row(self, names: tuple[str, ...], src: int, dst: int) -> None:
        """Copy row `src` of each named pipe to row `dst` (the runner's last-row classifier); a backend whose
        pipes the host cannot see copies them on the device."""
        for name in names:
            self.pipe(name)[dst] = self.pipe(name)[src]


class Backend(ABC):
    """Compiles graphs; knows nothing of models, files or the network."""

    name: str
    description: str  # e.g. "CPU (numba, 2 threads)" or the Vulkan device name

    @abstractmethod
    def compile(self, graph: Graph, weights: dict[str, Weight], max_batch: int) -> Program:
        """Allocate buffers for up to `max_batch` tokens per forward pass and take the node's weights."""
