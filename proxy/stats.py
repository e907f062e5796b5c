"""Counters since start: what the cache did with each speak request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.latency import Latency

# The X-TTS-Cache outcomes whose response times are kept.
TIMED_OUTCOMES = ("hit", "miss", "disabled")


def _timed_outcomes() -> dict[str, Latency]:
    return {outcome: Latency() for outcome in TIMED_OUTCOMES}


@dataclass
class CacheStats:
    """Outcomes counted by the cache plugin; read by the admin API and metrics."""

    hits: Counter[str] = field(default_factory=Counter)
    misses: int = 0
    coalesced: int = 0
    disabled: int = 0
    stored: int = 0
    upstream_calls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    # Response time of speak requests by outcome, observed by the access logger.
    request_seconds: dict[str, Latency] = field(default_factory=_timed_outcomes)
    # Time to the upstream's response headers, observed by HttpUpstream.
    upstream_seconds: Latency = field(default_factory=Latency)
    # Entries the janitor removed, by reason, summed over its runs (see note_janitor_run).
    evictions: Counter[str] = field(default_factory=Counter)
    janitor_runs_seen: int = 0
    # Lookups the index answered before the Volume, by outcome (proxy/index/lookup.py).
    index_lookups: Counter[str] = field(default_factory=Counter)
    # How misses were led across workers and replicas, by outcome (proxy/fleet/fills.py).
    fleet_fills: Counter[str] = field(default_factory=Counter)

    def note_janitor_run(self, runs: int, evicted: Mapping[str, int]) -> None:
        """Add the janitor's last report once per run: `runs` is its run counter."""
        if runs == self.janitor_runs_seen:
            return
        self.janitor_runs_seen = runs
        self.evictions.update({reason: n for reason, n in evicted.items() if n})
