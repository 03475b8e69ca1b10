"""Shared timing helper for the benchmarks: peers are timed in alternation so machine noise hits them alike."""

from __future__ import annotations

import time


def alternate(fns: dict, repeats: int, cpu: dict | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each function, after one warm-up call each, interleaved round by round.

    `cpu` (a dict), if given, receives the process CPU seconds of the same calls: on a machine shared with other
    work, wall time also counts the time other processes held the cores, CPU time mostly does not.
    """
    for fn in fns.values():
        fn()  # warm-up: first calls allocate and pick kernels
    times = {name: [] for name in fns}
    if cpu is not None:
        cpu.update({name: [] for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu[name].append(time.process_time() - start_cpu)
    return times
