"""The thread governor keeps the faster thread count for decode steps and follows a change of conditions."""

from __future__ import annotations

from cpu_fallback.threads import PROBE_EVERY, PROBE_STEPS, ThreadGovernor


class FakeMachine:
    """A step's cost by thread count (ms), on a clock the steps advance; records every thread setting."""

    def __init__(self, cost: dict[int, float]):
        self.cost, self.now, self.n, self.settings = cost, 0.0, 1, []

    def set_threads(self, n: int) -> None:
        self.n = n
        self.settings.append(n)

    def clock(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += self.cost[self.n]


def test_keeps_the_faster_count_and_switches_when_the_machine_changes():
    m = FakeMachine({2: 5.0, 1: 8.0})  # idle cores: two threads are faster
    g = ThreadGovernor(2, m.set_threads, m.clock)
    for _ in range(3 * PROBE_EVERY):
        g.run(m.step)
    assert g.threads == 2
    assert m.n == 2  # after a step the pool is back to all threads for other work
    used = m.settings[::2]  # the count each step ran with (every step is followed by the restore)
    assert used.count(1) == 3 * PROBE_STEPS  # one thread only in the trials
    m.cost = {2: 20.0, 1: 9.0}  # a busy program arrives: helper threads now cost more than they bring
    for _ in range(2 * PROBE_EVERY):
        g.run(m.step)
    assert g.threads == 1
    m.cost = {2: 5.0, 1: 8.0}  # it leaves again
    for _ in range(2 * PROBE_EVERY):
        g.run(m.step)
    assert g.threads == 2


def test_one_thread_never_changes_the_setting():
    m = FakeMachine({1: 3.0})
    g = ThreadGovernor(1, m.set_threads, m.clock)
    for _ in range(PROBE_EVERY + 1):
        g.run(m.step)
    assert g.threads == 1 and m.settings == []
