"""Whether handing work to the CPU runtime's workers pays right now, measured on the hand-offs themselves.

Every hand-off reports the CPU seconds its workers spent and the wall seconds it took from submitting to the last
result: their ratio is the speed-up over running the same parts one after another in the calling thread (about 2
with two free cores; about 1 or less when the machine's other processes hold a core, a worker then waiting for a
scheduler slice before it can start). The gauge keeps a decaying sum of both, so long hand-offs weigh more than
short ones. Below `WORTH` the runtime runs its parts in the calling thread for `BACK_OFF_S` seconds, then hands
off again to measure afresh.

Where the parts run never changes a result: the calling thread, at one intra-op thread, runs the very same
single-threaded operations the workers would (cpu.py), so the choice may follow the machine's load.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

WORTH = 1.2
"""The least speed-up (workers' CPU seconds / wall seconds of a hand-off) for which the workers keep the work."""
BACK_OFF_S = 0.5
"""Seconds the calling thread keeps the work after the speed-up fell below WORTH, before measuring again."""
DECAY = 0.75
"""Weight of the past in the decaying sums at each hand-off."""


class Gauge:
    """The workers' recent speed-up, and whether to hand work to them now (`wide`)."""

    def __init__(self, workers: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.workers = workers
        self._cpu = self._wall = 0.0  # nothing measured yet: the workers are trusted
        self._narrow_until = 0.0
        self._probing = False
        self._lock = threading.Lock()

    @property
    def speedup(self) -> float:
        """The decaying sums' ratio (`workers` before any hand-off)."""
        return self._cpu / self._wall if self._wall else float(self.workers)

    def wide(self) -> bool:
        """Whether to hand work to the workers now: unless a recent measurement fell below WORTH."""
        if self._narrow_until == 0.0:
            return True
        if self._clock() < self._narrow_until:
            return False
        self._probing = True  # the back-off is over: the next hand-off measures afresh
        return True

    def record(self, cpu_s: float, wall_s: float) -> None:
        """One hand-off: its workers spent cpu_s seconds of CPU in wall_s seconds."""
        with self._lock:
            if self._probing:  # what was measured before the back-off is stale
                self._cpu, self._wall, self._probing = 0.0, 0.0, False
            self._cpu = DECAY * self._cpu + cpu_s
            self._wall = DECAY * self._wall + max(wall_s, 1e-9)
            self._narrow_until = self._clock() + BACK_OFF_S if self.speedup < WORTH else 0.0
