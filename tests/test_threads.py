"""`--threads auto`: the thread count follows what the work itself measures, and re-probes as the load changes."""

from __future__ import annotations

import argparse

import pytest
import torch

from openseek.flags import add_threads_argument
from openseek.threads import AdaptiveThreads


class FakeWork:
    """Seconds a unit takes at each thread count, on a clock the test controls."""

    def __init__(self, costs: dict[int, float]):
        self.costs, self.now = costs, 0.0

    def clock(self) -> float:
        return self.now

    def run(self, tuner: AdaptiveThreads) -> int:
        with tuner.unit():
            used = torch.get_num_threads()
            self.now += self.costs[used]
        return used


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_busy_machine_moves_to_one_thread_and_a_quiet_one_back():
    work = FakeWork({2: 1.0, 1: 0.6})  # another process holds a core: two threads wait on each other
    tuner = AdaptiveThreads(window=2, hold=3, clock=work.clock, cores=2)
    used = [work.run(tuner) for _ in range(4)]
    assert used == [2, 2, 1, 1]  # one window at each count
    assert tuner.choice == 1
    held = [work.run(tuner) for _ in range(10)]  # hold × window × (1.0 / 0.6) units at the choice
    assert held == [1] * 10
    work.costs = {2: 0.5, 1: 0.9}  # the other process ended
    probe = [work.run(tuner) for _ in range(3)]
    assert probe == [2, 2, 1] and tuner.choice == 2  # one unit at 1 thread, 1.8x slower than both at 2, is enough
    assert work.run(tuner) == 2


def test_a_probe_close_to_the_window_before_it_is_timed_for_a_whole_window():
    work = FakeWork({2: 1.0, 1: 1.2})  # within ABANDON_AT of the two-thread window: one unit does not decide
    tuner = AdaptiveThreads(window=3, hold=1, clock=work.clock, cores=2)
    assert [work.run(tuner) for _ in range(6)] == [2, 2, 2, 1, 1, 1]
    assert tuner.choice == 2 and work.run(tuner) == 2


def test_a_fixed_count_is_kept():
    work = FakeWork({3: 1.0})
    tuner = AdaptiveThreads(fixed=3, window=1, hold=1, clock=work.clock, cores=2)
    assert [work.run(tuner) for _ in range(5)] == [3] * 5


def test_the_flag():
    parser = argparse.ArgumentParser()
    add_threads_argument(parser)
    assert parser.parse_args([]).threads is None
    assert parser.parse_args(["--threads", "auto"]).threads is None
    assert parser.parse_args(["--threads", "2"]).threads == 2
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])
