"""GET /_proxy/metrics: Prometheus text from the counters of the group, read at scrape time."""

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

from proxy.fleet.fills import OUTCOMES as FLEET_OUTCOMES
from proxy.fleet.sample import Histogram, ProcessSample
from proxy.fleet.view import GroupView
from proxy.index.lookup import OUTCOMES as LOOKUP_OUTCOMES
from proxy.latency import BUCKETS
from proxy.routes.responses import json_error

PREFIX: Final = "tts_proxy"
# Volume totals come from the index or a walk: refreshed at most this often, not per scrape.
TIER_SIZES_MAX_AGE_SECONDS: Final = 15.0
BREAKER_STATES: Final = ("closed", "open", "half-open")

Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class ProxyCollector(Collector):
    """Turns a sample (this process's, or its group's summed) into metric families."""

    def __init__(self) -> None:
        self.sample = ProcessSample()
        self.tiers: dict[str, Any] = {}

    def collect(self) -> Iterable[Metric]:
        """The families, from the sample taken for this scrape."""
        sample = self.sample
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Speak requests by cache outcome (X-TTS-Cache) and tier.",
            labels=["outcome", "tier"],
        )
        for tier in ("memory", "volume"):
            requests.add_metric(["hit", tier], sample.hits[tier])
        requests.add_metric(["miss", ""], sample.misses + sample.coalesced)
        requests.add_metric(["disabled", ""], sample.disabled)
        yield requests
        yield _counter("upstream_calls", "Speak misses sent upstream.", sample.upstream_calls)
        yield _counter("coalesced", "Misses that joined a fill in flight.", sample.coalesced)
        yield _counter("stored", "Responses committed to the cache.", sample.stored)
        yield from self._tiers()
        evictions = CounterMetricFamily(
            f"{PREFIX}_evictions", "Entries the janitor removed, by reason.", labels=["reason"]
        )
        for reason in ("budget", "ttl", "quota", "orphan"):
            evictions.add_metric([reason], sample.evictions[reason])
        yield evictions
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "Failures by kind: upstream, volume, index, ...", labels=["kind"]
        )
        for kind, total in sorted(sample.errors.items()):
            errors.add_metric([kind], total)
        yield errors
        yield from self._health()
        yield from fleet_families(sample)
        yield _histogram(
            "upstream_duration_seconds",
            "Time to the upstream's response headers.",
            [([], sample.upstream_seconds)],
        )
        yield _histogram(
            "request_duration_seconds",
            "Speak response time by cache outcome (observed by the access log).",
            [([outcome], histogram) for outcome, histogram in sample.request_seconds.items()],
            labels=["outcome"],
        )

    def _tiers(self) -> Iterable[Metric]:
        size = GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes held per tier.", labels=["tier"])
        count = GaugeMetricFamily(
            f"{PREFIX}_cache_entries", "Entries held per tier.", labels=["tier"]
        )
        # Memory is each process's own: summed. The Volume is shared: read once, never summed.
        size.add_metric(["memory"], self.sample.memory_bytes)
        count.add_metric(["memory"], self.sample.memory_entries)
        volume = self.tiers.get("volume") or {}
        if volume.get("bytes") is not None:
            size.add_metric(["volume"], volume["bytes"])
            count.add_metric(["volume"], volume["entries"])
        yield size
        yield count

    def _health(self) -> Iterable[Metric]:
        sample = self.sample
        if sample.breaker:
            breaker = GaugeMetricFamily(
                f"{PREFIX}_volume_breaker",
                "Processes whose Volume breaker is in each state (1 for a lone process).",
                labels=["state"],
            )
            for name in BREAKER_STATES:
                breaker.add_metric([name], sample.breaker[name])
            yield breaker
        if sample.volume_calls:
            calls = CounterMetricFamily(
                f"{PREFIX}_volume_calls",
                "Files API attempts by method and outcome.",
                labels=["method", "outcome"],
            )
            for (method, outcome), total in sorted(sample.volume_calls.items()):
                calls.add_metric([method, outcome], total)
            yield calls
            yield _counter(
                "volume_call_wait_seconds",
                "Seconds Files API calls waited for a slot (concurrency, rate, 429 pauses).",
                sample.volume_call_wait_seconds,
            )
        if sample.index:
            yield GaugeMetricFamily(
                f"{PREFIX}_index_available",
                "1 while PostgreSQL answers (every process of the group).",
                value=0.0 if sample.index["unavailable"] else 1.0,
            )
            if sample.token_rotating:
                yield from _token(sample)
            lookups = CounterMetricFamily(
                f"{PREFIX}_index_lookups",
                "Volume lookups the index answered first: absent ones made no Files API call.",
                labels=["outcome"],
            )
            for outcome in LOOKUP_OUTCOMES:
                lookups.add_metric([outcome], sample.index_lookups[outcome])
            yield lookups


def fleet_families(sample: ProcessSample) -> Iterable[Metric]:
    """The group's size and what crossed processes: invalidations, confirmations, gaps."""
    yield GaugeMetricFamily(
        f"{PREFIX}_workers", "Processes whose numbers this scrape sums.", value=sample.processes
    )
    received = CounterMetricFamily(
        f"{PREFIX}_invalidations",
        "Invalidations from other processes applied here, by kind (purge, stored).",
        labels=["kind"],
    )
    sent = CounterMetricFamily(
        f"{PREFIX}_invalidations_sent", "Invalidations sent to other processes.", labels=["kind"]
    )
    for kind in ("purge", "stored"):
        received.add_metric([kind], sample.invalidations[kind])
        sent.add_metric([kind], sample.invalidations_sent[kind])
    yield received
    yield sent
    yield _counter(
        "purges_unconfirmed",
        "Purges some expected process did not confirm within fleet.confirm_timeout_seconds.",
        sample.unconfirmed_purges,
    )
    yield _counter(
        "memory_flushes",
        "Whole memory tiers dropped because invalidations may have been missed "
        "(the PostgreSQL channel was lost).",
        sample.memory_flushes,
    )
    if sample.fleet_fills:
        fills = CounterMetricFamily(
            f"{PREFIX}_fleet_fills",
            "Misses led across workers and replicas, by how each was answered (owner,"
            " owner_fallback, for_sibling, lease, followed, takeover, wait_timeout,"
            " lease_unavailable).",
            labels=["outcome"],
        )
        for outcome in FLEET_OUTCOMES:
            fills.add_metric([outcome], sample.fleet_fills[outcome])
        yield fills
    if sample.listening:
        yield GaugeMetricFamily(
            f"{PREFIX}_invalidation_listening",
            "Processes whose PostgreSQL invalidation channel is connected.",
            value=sample.listening["connected"],
        )


def _token(sample: ProcessSample) -> Iterable[Metric]:
    yield _counter(
        "index_token_refresh_failures",
        "Failed refreshes of the index's rotating password (the Lakebase OAuth token).",
        sample.token_failures,
    )
    if sample.token_valid_seconds is not None:  # None: a token without a known expiry
        yield GaugeMetricFamily(
            f"{PREFIX}_index_token_valid_seconds",
            "Seconds the current token may still open connections (0: the index is skipped); "
            "with workers, the soonest to expire.",
            value=sample.token_valid_seconds,
        )


def _counter(name: str, documentation: str, value: float) -> Metric:
    family = CounterMetricFamily(f"{PREFIX}_{name}", documentation)
    family.add_metric([], value)
    return family


def _histogram(
    name: str,
    documentation: str,
    series: list[tuple[list[str], Histogram]],
    labels: list[str] | None = None,
) -> Metric:
    family = HistogramMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels or [])
    bounds = [*(repr(bound) for bound in BUCKETS), "+Inf"]
    for values, histogram in series:
        family.add_metric(values, list(zip(bounds, histogram.buckets, strict=True)), histogram.sum)
    return family


class Metrics:
    """This app's registry (not the process-global one) and the scrape handler."""

    def __init__(self, view: GroupView, snapshot: Snapshot | None = None) -> None:
        self.view = view
        self.collector = ProxyCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._snapshot = snapshot
        self._tiers_at = -TIER_SIZES_MAX_AGE_SECONDS

    async def handle(self, request: web.Request) -> web.Response:
        """GET /_proxy/metrics: open, like most exporters (no user data is exposed). With
        workers, any worker answers for the whole group; 503 when a worker's numbers are
        missing, since a smaller total would read as a counter reset."""
        group = await self.view.sample()
        if group.missing:
            pids = ", ".join(str(pid) for pid in group.missing)
            return json_error(503, f"workers {pids} did not answer; the group's sum is unknown")
        await self._refresh_tiers()
        self.collector.sample = group.sample
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
