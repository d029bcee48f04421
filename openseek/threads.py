"""How many threads torch runs on: measured on the work itself, because the best count changes with the machine's load.

On a quiet 2-core machine two intra-op threads decode and train faster than one. When another process keeps a core
busy, every parallel region waits for the thread the OS has descheduled, and each small op costs a scheduler time
slice: the same decode or training step runs several times slower (benchmarks/contention.py; benchmarks/RESULTS.md,
"A competing process"), while one thread barely notices. No setting chosen up front is right in both cases, so
`--threads auto` (the default of every command) times the repeated unit of work (a decode step, an optimizer step)
at each candidate count in turn, keeps the fastest, and probes again every so often, since the load comes and goes.
`--threads N` fixes the count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch


def parse_threads(value: str) -> int | None:
    """`auto` -> None (adaptive); a positive integer -> that many threads. For argparse `type=`."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto or a positive integer")
    return count


ABANDON_AT = 1.25  # a probed count whose first unit is this much slower than the window before it is not timed on


class AdaptiveThreads:
    """Chooses torch's intra-op thread count for one kind of repeated work by timing it.

    Wrap each unit of work in `with threads.unit():`. The tuner alternates windows of `window` units at each
    candidate count (all cores, then one), compares their median times (a unit carrying a one-off cost, such as the
    first step of a compiled decode, which compiles it, must not decide), stops timing a later count after its first
    unit if that unit is clearly slower than all of the window before it, and keeps the faster one for `hold` windows
    times how many times slower the other was, before probing again (so probing costs a few percent at most). With
    `fixed`, it just sets that count. Units should be of similar size within a few windows (decode steps,
    optimizer steps); the comparison only ever looks at adjacent windows.
    """

    def __init__(self, fixed: int | None = None, window: int = 4, hold: int = 8, clock=time.perf_counter,
                 cores: int | None = None):
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.fixed, self.window, self.hold, self.clock = fixed, window, hold, clock
        self.candidates = [fixed] if fixed else sorted({cores, 1}, reverse=True)
        self.choice = self.candidates[0]
        self._probe = list(self.candidates) if len(self.candidates) > 1 else []  # counts still to time
        self._times: dict[int, list[float]] = {}
        self._held, self._hold_units = 0, hold * window
        self._current = self.choice

    @property
    def threads(self) -> int:
        """The count the next unit runs with."""
        return self._current

    @contextmanager
    def unit(self):
        if torch.get_num_threads() != self._current:
            torch.set_num_threads(self._current)
        start = self.clock()
        yield
        self._record(self.clock() - start)

    def _record(self, seconds: float) -> None:
        if not self._probe:  # holding the choice
            self._held += 1
            if len(self.candidates) > 1 and self._held >= self._hold_units:
                self._probe, self._times, self._held = list(self.candidates), {}, 0
                self._current = self._probe[0]
            return
        times = self._times.setdefault(self._current, [])
        times.append(seconds)
        if len(times) < self.window and not self._clearly_slower(times):
            return
        self._probe.pop(0)
        if self._probe:  # time the next candidate
            self._current = self._probe[0]
            return
        medians = {n: statistics.median(t) for n, t in self._times.items()}
        self.choice = min(medians, key=medians.get)
        self._current = self.choice
        # Probing the loser again costs a window at its speed: the more it lost by, the longer before the next probe.
        loser = max(medians.values()) / max(medians[self.choice], 1e-12)
        self._hold_units = round(self.hold * self.window * max(1.0, loser))

    def _clearly_slower(self, times: list[float]) -> bool:
        """Whether a later candidate's first unit already lost: slower by ABANDON_AT than every unit of the window
        timed before it. On a quiet 2-core machine one thread is much slower per GRPO optimizer step, and
        timing it for a whole window cost several such steps each time it was probed."""
        timed = [t for n, t in self._times.items() if n != self._current]
        return len(times) == 1 and bool(timed) and times[0] > ABANDON_AT * max(max(t) for t in timed)
