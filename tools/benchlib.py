"""What every benchmark here measures the same way: memory from /proc/self/status and median latencies.

Peak RSS is the process's own VmHWM, not getrusage's ru_maxrss: on Linux a forked child's ru_maxrss
starts from its parent's RSS at fork, so a large parent would inflate every child's figure.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def proc_status_mb(field: str = "VmRSS") -> float:
    """A memory field of this process's /proc/self/status in MiB (VmRSS: current, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB)."""
    return proc_status_mb("VmHWM")


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls, after `warmup` untimed calls (first-call
    allocations, kernel selection)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))
