"""Shared timing helper for the benchmarks: peers are timed in alternation so machine noise hits them alike."""

from __future__ import annotations

import time


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, after one warm-up call each, interleaved round by round."""
    for fn in fns.values():
        fn()  # warm-up: first calls allocate and pick kernels
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
