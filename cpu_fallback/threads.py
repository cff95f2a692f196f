"""How many threads a single node's decode step uses, chosen by measurement as it runs.

A parallel launch wakes the OpenMP pool: cheap when its cores are idle and its threads spin briefly before
sleeping (GOMP_SPINCOUNT=1000, set in cpu_fallback/__init__.py), but beside another busy program a helper
thread costs a decode step more than it brings. So a decode step runs with all threads or with one,
whichever recent steps found faster (docs/BENCHMARKS.md has the figures).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

PROBE_EVERY = 32  # decode steps between trials of the other thread count
PROBE_STEPS = 3  # steps of each trial
HISTORY = 8  # recent step times kept per thread count


class ThreadGovernor:
    """Runs decode steps with `n_threads` or 1 thread: every PROBE_EVERY steps the other count runs
    PROBE_STEPS steps, then the count with the lower median of its recent step times is kept."""

    def __init__(
        self,
        n_threads: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.choices = (n_threads, 1) if n_threads > 1 else (1,)
        self.set_threads, self.clock = set_threads, clock
        self.times = {c: deque(maxlen=HISTORY) for c in self.choices}
        self.current, self.steps = 0, 0

    @property
    def threads(self) -> int:
        """The thread count decode steps use now (outside trials)."""
        return self.choices[self.current]

    def run(self, step: Callable[[], None]) -> None:
        """Run one decode step under the chosen (or trial) count; other work keeps all threads."""
        if len(self.choices) == 1:
            step()
            return
        phase = self.steps % PROBE_EVERY
        trial = phase >= PROBE_EVERY - PROBE_STEPS
        n = self.choices[1 - self.current] if trial else self.choices[self.current]
        self.set_threads(n)
        try:
            t0 = self.clock()
            step()
            self.times[n].append(self.clock() - t0)
        finally:
            self.set_threads(self.choices[0])
        self.steps += 1
        if phase == PROBE_EVERY - 1:
            medians = [statistics.median(self.times[c]) for c in self.choices]
            self.current = medians.index(min(medians))
