"""GroupView: the numbers of the whole `serve` group, this worker's plus its siblings', summed.

A scrape, the admin stats and the dashboard read them here, on whichever worker they reach.
Each sibling answers its own sample over its socket; a worker's counters live as long as the
group (a worker that dies stops every other), so a sum over every worker only grows. When a
sibling does not answer in time the view says so (`missing`), and the metrics endpoint answers
503 rather than a total that would look like a counter reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from proxy.admin.history import History, tally_evictions
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.group import Siblings, WorkerGroup
from proxy.fleet.sample import Histogram, ProcessSample
from proxy.index.entries import PostgresIndex
from proxy.janitor import Janitor
from proxy.stats import CacheStats
from proxy.storage.tiered import TieredCache

SAMPLE_PATH: Final = "/fleet/sample"


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


@dataclass
class Sampler:
    """This process's sample, read from its live counters (nothing is counted twice)."""

    stats: CacheStats
    cache: TieredCache
    index: PostgresIndex | None = None
    janitor: Janitor | None = None
    broadcast: Broadcast | None = None
    history: History | None = None

    def take(self, *, detail: bool = False) -> ProcessSample:
        """The counters now; `detail` adds the recent latencies and the last hour."""
        stats, cache = self.stats, self.cache
        if self.janitor is not None:
            tally_evictions(stats, self.janitor)
        sample = ProcessSample(
            hits=stats.hits.copy(),
            misses=stats.misses,
            coalesced=stats.coalesced,
            disabled=stats.disabled,
            stored=stats.stored,
            upstream_calls=stats.upstream_calls,
            evictions=stats.evictions.copy(),
            upstream_seconds=Histogram.of(stats.upstream_seconds, detail=detail),
            request_seconds={
                outcome: Histogram.of(latency, detail=detail)
                for outcome, latency in stats.request_seconds.items()
            },
        )
        sample.errors.update(error_counts(stats, cache, self.index))
        memory = cache.memory
        if memory is not None:
            sample.memory_entries, sample.memory_bytes = memory.entry_count, memory.current_bytes
        volume = cache.volume
        if volume is not None:
            if volume.breaker_state is not None:
                sample.breaker[volume.breaker_state] += 1
            calls = volume.call_stats()
            sample.volume_calls.update(calls.calls)
            sample.volume_call_wait_seconds = calls.wait_seconds
        sample.index_lookups.update(stats.index_lookups)
        sample.fleet_fills.update(stats.fleet_fills)
        if self.index is not None:
            sample.index["available" if self.index.available else "unavailable"] += 1
            token = self.index.pool.token
            if token is not None:
                sample.token_rotating = 1
                sample.token_failures = token.failures
                sample.token_valid_seconds = token.seconds_left
        self._fleet(sample)
        if detail and self.history is not None:
            self.history.sample()
            sample.minutes = self.history.last_hour()
        return sample

    def _fleet(self, sample: ProcessSample) -> None:
        broadcast = self.broadcast
        if broadcast is None:
            return
        sample.invalidations.update(broadcast.local.applied)
        sample.invalidations_sent.update(broadcast.sent)
        sample.unconfirmed_purges = broadcast.unconfirmed_purges
        sample.memory_flushes = broadcast.local.flushes
        if broadcast.bus is not None:
            sample.listening["connected" if broadcast.bus.connected else "lost"] += 1


@dataclass
class GroupSample:
    """A group's summed sample, and the workers whose numbers it lacks."""

    sample: ProcessSample
    expected: int
    missing: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """For the admin stats: how many processes the numbers cover."""
        return {"sampled": self.sample.processes, "expected": self.expected}


class GroupView:
    """This worker's sample plus every sibling's, over the group's sockets."""

    def __init__(
        self,
        sampler: Sampler,
        *,
        group: WorkerGroup | None = None,
        siblings: Siblings | None = None,
        timeout_seconds: float = 2.0,
    ) -> None:
        self.sampler = sampler
        self.group = group
        self.siblings = siblings
        self.timeout = timeout_seconds

    def serve_on(self, server: Any) -> None:
        """Answer the siblings' requests for this worker's sample."""
        server.add_route("GET", SAMPLE_PATH, self._answer)

    async def sample(self, *, detail: bool = False) -> GroupSample:
        """The group's numbers now (this process alone without a group)."""
        total = self.sampler.take(detail=detail)
        if self.siblings is None or self.group is None:
            return GroupSample(total, 1)
        path = f"{SAMPLE_PATH}?detail=1" if detail else SAMPLE_PATH
        missing: list[int] = []
        for answer in await self.siblings.call_all("GET", path, within=self.timeout):
            try:
                if not answer.ok:
                    raise ValueError(answer.error)
                total.add(ProcessSample.from_json(answer.data))
            except (ValueError, TypeError, KeyError):
                missing.append(answer.pid)
        return GroupSample(total, self.group.size, missing)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        detail = request.query.get("detail") == "1"
        return web.json_response(self.sampler.take(detail=detail).to_json())
