"""OpenMP's wait policy, chosen before torch is imported (OpenMP reads it when torch loads it).

On a machine that is already busy when droppos starts, OpenMP threads that wait for work sleep
instead of spinning (unless the user set `OMP_WAIT_POLICY`): spinning threads starve the loader
workers and the other processes (a demo epoch beside one busy process: 37.5 s spinning, 18.8 s
sleeping). On an idle machine spinning is faster (the whole demo: 109 s against 121 s), so there
it stays.
"""

from __future__ import annotations

import os
import time


def _busy_and_total() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def busy_machine(window: float = 0.1) -> bool:
    """Other processes keep at least half a core busy right now (sampled over `window`
    seconds; a load average would also count the run that just ended). False where the
    kernel does not say (no /proc/stat)."""
    try:
        busy0, total0 = _busy_and_total()
        time.sleep(window)
        busy1, total1 = _busy_and_total()
    except (OSError, ValueError, IndexError):
        return False
    cores = os.cpu_count() or 1
    elapsed = total1 - total0
    return elapsed > 0 and (busy1 - busy0) / elapsed * cores >= 0.5


if busy_machine():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
