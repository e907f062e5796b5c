"""ProcessSample: one process's numbers as plain data, summed over the workers of a group.

Counters and histograms add up; per-process gauges (memory held) add up; states (the Volume's
breaker, the index) become how many processes are in each. What every process shares (the
Volume's totals, the top users) is not in a sample: it is read once, where it is shown.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from proxy.admin.history import Minute
from proxy.latency import BUCKETS, Latency
from proxy.stats import TIMED_OUTCOMES


@dataclass
class Histogram:
    """A latency histogram: cumulative counts per bound (+Inf last), their sum, and, in a
    detailed sample, the recent values behind percentiles."""

    buckets: list[float] = field(default_factory=lambda: [0.0] * (len(BUCKETS) + 1))
    sum: float = 0.0
    recent: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, latency: Latency, *, detail: bool) -> Histogram:
        """The histogram of `latency` now."""
        counts = [count for _, count in latency.buckets()]
        return cls(counts, latency.sum, list(latency.recent) if detail else [])

    @property
    def count(self) -> int:
        """How many durations were observed."""
        return int(self.buckets[-1])

    def add(self, other: Histogram) -> None:
        """Add another process's histogram to this one."""
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.sum += other.sum
        self.recent.extend(other.recent)

    def percentile(self, fraction: float) -> float | None:
        """The `fraction` quantile of the recent values (nearest rank); None when empty."""
        latency = Latency()
        latency.recent.extend(self.recent)
        return latency.percentile(fraction)


@dataclass
class ProcessSample:
    """What one process (or, summed, a group) counted since start."""

    processes: int = 1
    hits: Counter[str] = field(default_factory=Counter)
    misses: int = 0
    coalesced: int = 0
    disabled: int = 0
    stored: int = 0
    upstream_calls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    memory_entries: int = 0
    memory_bytes: int = 0
    # How many processes are in each state.
    breaker: Counter[str] = field(default_factory=Counter)
    index: Counter[str] = field(default_factory=Counter)
    listening: Counter[str] = field(default_factory=Counter)
    volume_calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    volume_call_wait_seconds: float = 0.0
    # Index lookups by outcome; the rotating index password's failed refreshes, and how long the
    # soonest-expiring token of the group still opens connections (None: no rotating password).
    index_lookups: Counter[str] = field(default_factory=Counter)
    token_rotating: int = 0
    token_failures: int = 0
    token_valid_seconds: float | None = None
    # Invalidations: received (by kind), sent (by kind), purges left unconfirmed, and whole
    # memory tiers dropped after a gap in the PostgreSQL channel.
    invalidations: Counter[str] = field(default_factory=Counter)
    invalidations_sent: Counter[str] = field(default_factory=Counter)
    unconfirmed_purges: int = 0
    memory_flushes: int = 0
    # How misses were led across workers and replicas, by outcome (proxy/fleet/fills.py).
    fleet_fills: Counter[str] = field(default_factory=Counter)
    upstream_seconds: Histogram = field(default_factory=Histogram)
    request_seconds: dict[str, Histogram] = field(
        default_factory=lambda: {outcome: Histogram() for outcome in TIMED_OUTCOMES}
    )
    # The last hour, minute by minute (in a detailed sample only).
    minutes: list[Minute] = field(default_factory=list)

    def add(self, other: ProcessSample) -> None:
        """Add another process's sample to this one."""
        self.processes += other.processes
        for name in ("misses", "coalesced", "disabled", "stored", "upstream_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("memory_entries", "memory_bytes", "unconfirmed_purges", "memory_flushes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.volume_call_wait_seconds += other.volume_call_wait_seconds
        self.token_rotating += other.token_rotating
        self.token_failures += other.token_failures
        if other.token_valid_seconds is not None:
            mine = self.token_valid_seconds
            theirs = other.token_valid_seconds
            self.token_valid_seconds = theirs if mine is None else min(mine, theirs)
        for counter in _COUNTERS:
            getattr(self, counter).update(getattr(other, counter))
        self.volume_calls.update(other.volume_calls)
        self.upstream_seconds.add(other.upstream_seconds)
        for outcome, histogram in other.request_seconds.items():
            self.request_seconds.setdefault(outcome, Histogram()).add(histogram)
        self.minutes = add_minutes(self.minutes, other.minutes)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, for a sibling's answer."""
        data = {name: getattr(self, name) for name in _SCALARS}
        data.update({name: dict(getattr(self, name)) for name in _COUNTERS})
        data["volume_calls"] = [[m, o, n] for (m, o), n in self.volume_calls.items()]
        data["upstream_seconds"] = dataclasses.asdict(self.upstream_seconds)
        data["request_seconds"] = {
            outcome: dataclasses.asdict(histogram)
            for outcome, histogram in self.request_seconds.items()
        }
        data["minutes"] = [dataclasses.asdict(minute) for minute in self.minutes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessSample:
        """Read a sibling's answer (a ValueError, TypeError or KeyError when malformed)."""
        sample = cls(**{name: data[name] for name in _SCALARS})
        for name in _COUNTERS:
            setattr(sample, name, Counter({str(k): v for k, v in data[name].items()}))
        sample.volume_calls = Counter(
            {(str(m), str(o)): int(n) for m, o, n in data["volume_calls"]}
        )
        sample.upstream_seconds = Histogram(**data["upstream_seconds"])
        sample.request_seconds = {
            str(outcome): Histogram(**histogram)
            for outcome, histogram in data["request_seconds"].items()
        }
        sample.minutes = [Minute(**minute) for minute in data["minutes"]]
        return sample

    @property
    def hit_count(self) -> int:
        """Hits from every tier."""
        return sum(self.hits.values())


_SCALARS = (
    "processes",
    "misses",
    "coalesced",
    "disabled",
    "stored",
    "upstream_calls",
    "memory_entries",
    "memory_bytes",
    "volume_call_wait_seconds",
    "unconfirmed_purges",
    "memory_flushes",
    "token_rotating",
    "token_failures",
    "token_valid_seconds",
)
_COUNTERS = (
    "hits",
    "errors",
    "evictions",
    "breaker",
    "index",
    "listening",
    "invalidations",
    "invalidations_sent",
    "index_lookups",
    "fleet_fills",
)


def add_minutes(mine: list[Minute], theirs: list[Minute]) -> list[Minute]:
    """Two processes' last hours, minute by minute, added."""
    if not theirs:
        return mine
    if not mine:
        return [dataclasses.replace(minute) for minute in theirs]
    by_minute = {minute.minute: dataclasses.replace(minute) for minute in mine}
    for minute in theirs:
        held = by_minute.get(minute.minute)
        if held is None:
            by_minute[minute.minute] = dataclasses.replace(minute)
            continue
        for name in _MINUTE_COUNTS:
            setattr(held, name, getattr(held, name) + getattr(minute, name))
    return [by_minute[m] for m in sorted(by_minute)]


_MINUTE_COUNTS = tuple(f.name for f in dataclasses.fields(Minute) if f.name != "minute")
