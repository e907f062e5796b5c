"""GET /_proxy/metrics: Prometheus text from the existing counters, read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from proxy.admin.history import tally_evictions
from proxy.index.entries import PostgresIndex
from proxy.index.lookup import OUTCOMES as LOOKUP_OUTCOMES
from proxy.index.rotating_password import RotatingPassword
from proxy.janitor import Janitor
from proxy.latency import Latency
from proxy.stats import CacheStats
from proxy.storage.tiered import TieredCache

PREFIX: Final = "tts_proxy"
# Volume totals come from the index or a walk: refreshed at most this often, not per scrape.
TIER_SIZES_MAX_AGE_SECONDS: Final = 15.0
BREAKER_STATES: Final = ("closed", "open", "half-open")

Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class ProxyCollector(Collector):
    """Turns CacheStats, the tiers, the index and the janitor into metric families."""

    def __init__(
        self,
        stats: CacheStats,
        cache: TieredCache,
        *,
        index: PostgresIndex | None = None,
        janitor: Janitor | None = None,
    ) -> None:
        self.stats = stats
        self.cache = cache
        self.index = index
        self.janitor = janitor
        self.tiers: dict[str, Any] = {}

    def collect(self) -> Iterable[Metric]:
        """The families, from the counters as they are now."""
        stats = self.stats
        if self.janitor is not None:
            tally_evictions(stats, self.janitor)
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Speak requests by cache outcome (X-TTS-Cache) and tier.",
            labels=["outcome", "tier"],
        )
        for tier in ("memory", "volume"):
            requests.add_metric(["hit", tier], stats.hits[tier])
        requests.add_metric(["miss", ""], stats.misses + stats.coalesced)
        requests.add_metric(["disabled", ""], stats.disabled)
        yield requests
        yield _counter("upstream_calls", "Speak misses sent upstream.", stats.upstream_calls)
        yield _counter("coalesced", "Misses that joined a fill in flight.", stats.coalesced)
        yield _counter("stored", "Responses committed to the cache.", stats.stored)
        yield from self._tiers()
        evictions = CounterMetricFamily(
            f"{PREFIX}_evictions", "Entries the janitor removed, by reason.", labels=["reason"]
        )
        for reason in ("budget", "ttl", "quota", "orphan"):
            evictions.add_metric([reason], stats.evictions[reason])
        yield evictions
        yield self._errors()
        yield from self._health()
        yield _histogram(
            "upstream_duration_seconds",
            "Time to the upstream's response headers.",
            [([], stats.upstream_seconds)],
        )
        yield _histogram(
            "request_duration_seconds",
            "Speak response time by cache outcome (observed by the access log).",
            [([outcome], latency) for outcome, latency in stats.request_seconds.items()],
            labels=["outcome"],
        )

    def _tiers(self) -> Iterable[Metric]:
        size = GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes held per tier.", labels=["tier"])
        count = GaugeMetricFamily(
            f"{PREFIX}_cache_entries", "Entries held per tier.", labels=["tier"]
        )
        memory = self.cache.memory
        size.add_metric(["memory"], memory.current_bytes if memory else 0)
        count.add_metric(["memory"], memory.entry_count if memory else 0)
        volume = self.tiers.get("volume") or {}
        if volume.get("bytes") is not None:
            size.add_metric(["volume"], volume["bytes"])
            count.add_metric(["volume"], volume["entries"])
        yield size
        yield count

    def _errors(self) -> Metric:
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "Failures by kind: upstream, volume, index, ...", labels=["kind"]
        )
        for kind, total in sorted(error_counts(self.stats, self.cache, self.index).items()):
            errors.add_metric([kind], total)
        return errors

    def _health(self) -> Iterable[Metric]:
        volume = self.cache.volume
        state = volume.breaker_state if volume is not None else None
        if state is not None:
            breaker = GaugeMetricFamily(
                f"{PREFIX}_volume_breaker", "1 for the Volume breaker's state.", labels=["state"]
            )
            for name in BREAKER_STATES:
                breaker.add_metric([name], 1.0 if state == name else 0.0)
            yield breaker
        if volume is not None:
            stats = volume.call_stats()
            if stats.calls:
                calls = CounterMetricFamily(
                    f"{PREFIX}_volume_calls",
                    "Files API attempts by method and outcome.",
                    labels=["method", "outcome"],
                )
                for (method, outcome), total in sorted(stats.calls.items()):
                    calls.add_metric([method, outcome], total)
                yield calls
                yield _counter(
                    "volume_call_wait_seconds",
                    "Seconds Files API calls waited for a slot (concurrency, rate, 429 pauses).",
                    stats.wait_seconds,
                )
        if self.index is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_index_available",
                "1 while PostgreSQL answers.",
                value=1.0 if self.index.available else 0.0,
            )
            if self.index.pool.token is not None:
                yield from _token(self.index.pool.token)
            lookups = CounterMetricFamily(
                f"{PREFIX}_index_lookups",
                "Volume lookups the index answered first: absent ones made no Files API call.",
                labels=["outcome"],
            )
            for outcome in LOOKUP_OUTCOMES:
                lookups.add_metric([outcome], self.stats.index_lookups[outcome])
            yield lookups


def error_counts(
    stats: CacheStats, cache: TieredCache, index: PostgresIndex | None
) -> dict[str, int]:
    """Errors since start by kind: upstream, memory, volume, volume_corrupt, index, ..."""
    counts: dict[str, int] = {"upstream": 0, "volume": 0, "index": 0}
    for source in (stats.errors, cache.errors):
        for kind, total in source.items():
            counts[kind] = counts.get(kind, 0) + total
    if cache.volume is not None:
        # Entries a read found corrupt, removed and missed (the request went on as a miss).
        counts["volume_corrupt"] = cache.volume.corrupt_entries
    if index is not None:
        counts["index"] += sum(index.errors.values())
        if index.pool.token is not None:
            counts["index_token"] = index.pool.token.failures
    return counts


def _token(token: RotatingPassword) -> Iterable[Metric]:
    yield _counter(
        "index_token_refresh_failures",
        "Failed refreshes of the index's rotating password (the Lakebase OAuth token).",
        token.failures,
    )
    left = token.seconds_left
    if left is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_index_token_valid_seconds",
            "Seconds the current token may still open connections (0: the index is skipped).",
            value=left,
        )


def _counter(name: str, documentation: str, value: float) -> Metric:
    family = CounterMetricFamily(f"{PREFIX}_{name}", documentation)
    family.add_metric([], value)
    return family


def _histogram(
    name: str,
    documentation: str,
    series: list[tuple[list[str], Latency]],
    labels: list[str] | None = None,
) -> Metric:
    family = HistogramMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels or [])
    for values, latency in series:
        family.add_metric(values, latency.buckets(), latency.sum)
    return family


class Metrics:
    """This app's registry (not the process-global one) and the scrape handler."""

    def __init__(self, collector: ProxyCollector, snapshot: Snapshot | None = None) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._snapshot = snapshot
        self._tiers_at = -TIER_SIZES_MAX_AGE_SECONDS

    async def handle(self, request: web.Request) -> web.Response:
        """GET /_proxy/metrics: open, like most exporters (no user data is exposed)."""
        await self._refresh_tiers()
        # The text format 0.0.4 unless the scraper asks for OpenMetrics or text 1.0.0.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def _refresh_tiers(self) -> None:
        if self._snapshot is None:
            return
        now = time.monotonic()
        if now - self._tiers_at < TIER_SIZES_MAX_AGE_SECONDS:
            return
        self._tiers_at = now
        snapshot = await self._snapshot()
        self.collector.tiers = snapshot.get("tiers", {})
