"""Latency: a histogram in Prometheus buckets plus a window of recent values for percentiles."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from typing import Final

# Seconds: from a memory hit (sub-millisecond) to a long synthesis (a minute).
BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
RECENT: Final = 1024


class Latency:
    """Observed durations: cumulative bucket counts (for metrics) and the last RECENT values."""

    __slots__ = ("_counts", "count", "recent", "sum")

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT)

    def observe(self, seconds: float) -> None:
        """Count one duration; no I/O, no lock (the event loop is the only writer)."""
        self._counts[bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.recent.append(seconds)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts per upper bound, `+Inf` last, as Prometheus histograms expose them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*BUCKETS, math.inf), self._counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), float(running)))
        return out

    def percentile(self, fraction: float) -> float | None:
        """The `fraction` quantile (0..1) of the recent values, nearest rank; None when empty."""
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        rank = max(0, math.ceil(fraction * len(ordered)) - 1)
        return ordered[min(rank, len(ordered) - 1)]
