"""How many threads a single node's decode step uses, chosen by measurement as it runs.

A parallel launch wakes the OpenMP pool: cheap when its cores are idle and its threads spin briefly before
sleeping (GOMP_SPINCOUNT=1000, set in cpu_fallback/__init__.py), but beside another busy program a helper
thread costs a decode step more than it brings. So a decode step runs with all threads or with one,
whichever recent steps found faster (docs/BENCHMARKS.md has the figures). The first trial comes after a few
steps, so a generation beside a busy program leaves the slow count at once; a trial that confirms the count
in use doubles the wait before the next, and one whose first step is clearly slower ends there.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

FIRST_TRIAL = 3  # decode steps before the first trial of the other thread count
PROBE_STEPS = 3  # steps of a trial
PROBE_EVERY = 32  # steps between trials after a switch ...
PROBE_MAX = 512  # ... doubled by every trial that keeps the count, up to this
GIVE_UP = 1.25  # a trial step this much slower than the count in use ends the trial at once
HISTORY = 8  # recent step times kept per thread count


class ThreadGovernor:
    """Runs decode steps with `n_threads` or 1 thread, trying the other count now and then (see above) and
    keeping the one with the lower median step time."""

    def __init__(
        self,
        n_threads: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.choices = (n_threads, 1) if n_threads > 1 else (1,)
        self.set_threads, self.clock = set_threads, clock
        self.times = {c: deque(maxlen=HISTORY) for c in self.choices}
        self.current = 0
        self.interval = PROBE_EVERY
        self.until_trial = FIRST_TRIAL  # steps with the count in use before the next trial
        self.trial: list[float] = []  # this trial's step times, while one runs (until_trial is 0)

    @property
    def threads(self) -> int:
        """The thread count decode steps use now (outside trials)."""
        return self.choices[self.current]

    def run(self, step: Callable[[], None]) -> None:
        """Run one decode step under the chosen (or trial) count; other work keeps all threads."""
        if len(self.choices) == 1:
            step()
            return
        in_trial = self.until_trial == 0
        n = self.choices[1 - self.current] if in_trial else self.threads
        self.set_threads(n)
        try:
            t0 = self.clock()
            step()
            dt = self.clock() - t0
        finally:
            self.set_threads(self.choices[0])
        if not in_trial:
            self.times[n].append(dt)
            self.until_trial -= 1
            return
        self.trial.append(dt)
        usual = statistics.median(self.times[self.threads])
        if len(self.trial) == PROBE_STEPS or dt > GIVE_UP * usual:
            self._decide(statistics.median(self.trial) < usual)

    def _decide(self, other_faster: bool) -> None:
        """End a trial: switch to the other count if it was faster, else wait twice as long for the next."""
        other = self.choices[1 - self.current]
        if other_faster:
            self.times[other].clear()
            self.times[other].extend(self.trial)
            self.current = 1 - self.current
            self.interval = PROBE_EVERY
        else:
            self.interval = min(2 * self.interval, PROBE_MAX)
        self.trial, self.until_trial = [], self.interval
