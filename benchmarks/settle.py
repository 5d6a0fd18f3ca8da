"""Wait for the machine to go quiet before a timed run.

After a timed run, the side that ran keeps a core busy for a while: vLLM's CPU worker was seen
spinning on one core for 0.6-0.7 s after its last request (sampled from /proc on the 2-core
machine), and an OpenMP runtime's threads spin after their last parallel region. A fixed pause
shorter than that hands the next run a core short for its first steps. So the pause lasts until
the whole machine (Linux's /proc/stat, every process) is idle for a few samples in a row, at
least `least_s` and at most `most_s`; where /proc/stat does not exist, it is a plain pause.
"""

from __future__ import annotations

import time
from pathlib import Path

STAT = Path("/proc/stat")


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None without /proc/stat."""
    try:
        fields = [int(x) for x in STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def settle(least_s: float = 0.5, most_s: float = 3.0, busy_below: float = 0.1,
           quiet_samples: int = 3, sample_s: float = 0.1) -> float:
    """Sleep until the machine's CPUs were under `busy_below` busy for `quiet_samples` samples
    of `sample_s` in a row (and at least `least_s`); returns the seconds waited."""
    start = time.perf_counter()
    time.sleep(least_s)
    last, quiet = _cpu_times(), 0
    if last is None:
        return time.perf_counter() - start
    while quiet < quiet_samples and time.perf_counter() - start < most_s:
        time.sleep(sample_s)
        now = _cpu_times()
        if now is None:
            break
        busy, total = now[0] - last[0], now[1] - last[1]
        quiet = quiet + 1 if total <= 0 or busy / total < busy_below else 0
        last = now
    return time.perf_counter() - start
