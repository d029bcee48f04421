"""What the benchmarks log before each run or round, so a reader can see the machine's phase: `uptime` (load
averages) and the read bandwidth of a 2-thread sum over 256 MiB (best of 3; this VM's speed drifts by up to 2× within
minutes as neighbours load its memory system). Imported by the scripts in this folder (run as
`python benchmarks/<script>.py`, which puts this folder on the path)."""

from __future__ import annotations

import subprocess
import time


def read_bandwidth() -> float:
    """GB/s of a 2-thread sum over 256 MiB, best of 3 (the calling process's thread count is restored)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.ones(2**26)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - start)
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(threads)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def state() -> str:
    """One line: the read bandwidth and `uptime`, measured now."""
    return f"read bandwidth {read_bandwidth():.1f} GB/s; {uptime()}"
