"""The thread governor keeps the faster thread count for decode steps, leaves a slow one within a few steps,
and follows a change of conditions."""

from __future__ import annotations

from cpu_fallback.threads import FIRST_TRIAL, PROBE_EVERY, PROBE_MAX, PROBE_STEPS, ThreadGovernor


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


def counts_used(m: FakeMachine) -> list[int]:
    return m.settings[::2]  # the count each step ran with (every step is followed by the restore)


def test_keeps_the_faster_count_and_tries_the_other_ever_less_often():
    m = FakeMachine({2: 5.0, 1: 8.0})  # idle cores: two threads are faster
    g = ThreadGovernor(2, m.set_threads, m.clock)
    steps = FIRST_TRIAL + 1 + 2 * PROBE_EVERY + 1 + 4 * PROBE_EVERY + 1
    for _ in range(steps):
        g.run(m.step)
    assert g.threads == 2
    assert m.n == 2  # after a step the pool is back to all threads for other work
    used = counts_used(m)
    # each trial ends after its first step (8 > 1.25 x 5 ms): after 3 steps, then 64 and 128 steps later
    assert [i for i, n in enumerate(used) if n == 1] == [3, 3 + 1 + 2 * PROBE_EVERY, steps - 1]


def test_a_busy_program_is_left_within_a_few_steps_and_after_it_goes_two_threads_return():
    m = FakeMachine({2: 20.0, 1: 9.0})  # a busy program: the helper thread costs more than it brings
    g = ThreadGovernor(2, m.set_threads, m.clock)
    for _ in range(FIRST_TRIAL + PROBE_STEPS):
        g.run(m.step)
    assert g.threads == 1  # decided by the first trial
    for _ in range(8 * PROBE_EVERY):
        g.run(m.step)
    assert g.threads == 1
    # trials of two threads end after one step; their waits double from PROBE_EVERY: 32, 64, 128 steps
    assert counts_used(m)[:FIRST_TRIAL].count(2) == FIRST_TRIAL
    assert counts_used(m)[FIRST_TRIAL + PROBE_STEPS :].count(2) == 3
    m.cost = {2: 5.0, 1: 8.0}  # it leaves again: the next trial (within PROBE_MAX steps) switches back
    for _ in range(PROBE_MAX + PROBE_STEPS):
        g.run(m.step)
    assert g.threads == 2


def test_a_slower_first_step_of_a_close_trial_does_not_end_it_early():
    m = FakeMachine({2: 5.0, 1: 5.5})  # within GIVE_UP: the trial runs all its steps
    g = ThreadGovernor(2, m.set_threads, m.clock)
    for _ in range(FIRST_TRIAL + PROBE_STEPS):
        g.run(m.step)
    assert counts_used(m).count(1) == PROBE_STEPS and g.threads == 2


def test_one_thread_never_changes_the_setting():
    m = FakeMachine({1: 3.0})
    g = ThreadGovernor(1, m.set_threads, m.clock)
    for _ in range(PROBE_EVERY + 1):
        g.run(m.step)
    assert g.threads == 1 and m.settings == []
