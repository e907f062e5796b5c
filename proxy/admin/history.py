"""The last hour, minute by minute: a ring buffer fed from CacheStats by a background task."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from proxy.janitor import Janitor
from proxy.stats import CacheStats

log = logging.getLogger(__name__)

MINUTES = 60
SAMPLE_SECONDS = 5.0


@dataclass
class Minute:
    """What the cache did during one wall-clock minute."""

    minute: int  # seconds since the epoch // 60
    memory_hits: int = 0
    volume_hits: int = 0
    misses: int = 0
    coalesced: int = 0
    disabled: int = 0
    upstream_calls: int = 0

    @property
    def cacheable(self) -> int:
        """Requests the cache could answer: hits, misses and joined misses."""
        return self.memory_hits + self.volume_hits + self.misses + self.coalesced

    @property
    def requests(self) -> int:
        """Every speak request, cacheable or not."""
        return self.cacheable + self.disabled


_COUNTED = tuple(f.name for f in fields(Minute) if f.name != "minute")


def _totals(stats: CacheStats) -> dict[str, int]:
    return {
        "memory_hits": stats.hits["memory"],
        "volume_hits": stats.hits["volume"],
        "misses": stats.misses,
        "coalesced": stats.coalesced,
        "disabled": stats.disabled,
        "upstream_calls": stats.upstream_calls,
    }


class History:
    """Per-minute counters for the last MINUTES minutes; `sample()` is cheap and synchronous."""

    def __init__(
        self,
        stats: CacheStats,
        *,
        janitor: Janitor | None = None,
        minutes: int = MINUTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.janitor = janitor
        self.minutes = minutes
        self.started = clock()
        self.clock = clock  # injectable: tests and screenshots compress time
        self._buckets: deque[Minute] = deque(maxlen=minutes)
        self._last = _totals(stats)

    def sample(self) -> None:
        """Move what happened since the last sample into the current minute's bucket."""
        now = _totals(self.stats)
        minute = int(self.clock() // 60)
        if not self._buckets or self._buckets[-1].minute != minute:
            self._buckets.append(Minute(minute))
        bucket = self._buckets[-1]
        for name in _COUNTED:
            setattr(bucket, name, getattr(bucket, name) + now[name] - self._last[name])
        self._last = now
        if self.janitor is not None:
            tally_evictions(self.stats, self.janitor)

    def last_hour(self) -> list[Minute]:
        """One bucket per minute, oldest first, minutes without requests included as zeros."""
        current = int(self.clock() // 60)
        known = {bucket.minute: bucket for bucket in self._buckets}
        first = current - self.minutes + 1
        return [known.get(m, Minute(m)) for m in range(first, current + 1)]

    def requests_per_second(self, window_seconds: float = 300.0) -> float:
        """Speak requests per second over the last `window_seconds` (or since start)."""
        return requests_per_second(
            self._buckets, now=self.clock(), started=self.started, window_seconds=window_seconds
        )

    async def run(self, interval: float = SAMPLE_SECONDS) -> None:
        """Sample every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.sample()
            except Exception as exc:
                log.warning("history sample failed: %s", type(exc).__name__)


def requests_per_second(
    minutes: Iterable[Minute], *, now: float, started: float, window_seconds: float = 300.0
) -> float:
    """Speak requests per second over the last `window_seconds` of `minutes` (or since start)."""
    first_minute = int((now - window_seconds) // 60)
    count = sum(b.requests for b in minutes if b.minute > first_minute)
    covered = min(window_seconds, max(now - started, 1.0))
    return count / covered


def tally_evictions(stats: CacheStats, janitor: Janitor) -> None:
    """Add the janitor's last run to the eviction totals (once per run)."""
    report = janitor.last_report
    if report is None:
        return
    stats.note_janitor_run(
        janitor.runs,
        {
            "budget": report.evicted_budget,
            "ttl": report.evicted_ttl,
            "quota": report.evicted_quota,
            "orphan": report.orphans_removed,
        },
    )
