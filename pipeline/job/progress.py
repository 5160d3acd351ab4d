"""Progress lines that read well in a terminal and in `ray job logs` alike.

One plain line per step, never redrawn; when units finish faster than once per
``min_interval`` seconds, lines are skipped (the last unit is always reported).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(self, total_units: int, total_bytes: int, workers: int, log: Callable[[str], None],
                 min_interval: float = 1.0) -> None:
        self.total_units, self.total_bytes, self.workers = total_units, total_bytes, workers
        self.log, self.min_interval = log, min_interval
        self.start = time.perf_counter()
        self.done_units = self.done_bytes = 0
        self.per_worker: Counter[str] = Counter()
        self.last_line = float("-inf")

    def unit_done(self, name: str, nbytes: int, worker: str, seconds: float) -> None:
        self.done_units += 1
        self.done_bytes += nbytes
        self.per_worker[worker] += 1
        now = time.perf_counter()
        if now - self.last_line < self.min_interval and self.done_units < self.total_units:
            return
        self.last_line = now
        elapsed = now - self.start
        rate = self.done_bytes / max(elapsed, 1e-9)
        share = self.done_bytes / max(self.total_bytes, 1)
        # Too early for a rate that means anything (the first units may be tiny norms).
        eta = _duration((self.total_bytes - self.done_bytes) / rate) if share >= 0.05 and rate > 0 else "?"
        busy = min(self.workers, self.total_units - self.done_units)
        self.log(
            f"[{self.done_units:>{len(str(self.total_units))}}/{self.total_units} {100 * share:5.1f}%] "
            f"{rate / 1e9:.3f} GB/s, eta {eta}, {busy}/{self.workers} workers busy | {name} on {worker} ({seconds:.1f}s)"
        )

    def worker_summary(self) -> str:
        return ", ".join(f"{w}: {n}" for w, n in sorted(self.per_worker.items()))
