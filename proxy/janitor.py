"""The janitor: keeps the Volume within its budgets and free of crash leftovers, off requests.

Each run, in order: crash leftovers on the Volume (and, with an index, rows whose object is gone),
then entries idle past `cache.volume.ttl_seconds`, then each user's least recently hit entries past
`cache.volume.user_max_bytes`, then the fleet's least recently hit entries past
`cache.volume.max_bytes`. Every step does at most `cache.janitor_batch_size` removals a run; what
is left waits for the next run.

With a PostgreSQL index the figures come from the index and one replica (the holder of an advisory
lock) does the work for the fleet. Without one, each run walks the Volume: a local Volume's last hit
is its sidecar's mtime; a Databricks Volume keeps no access times, so there an entry is idle since
it was written, unless this process saw it hit in memory (`record_hit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from proxy.config import CacheSettings
from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo as StoredEntryInfo
from proxy.storage.index import IndexUnavailable, PostgresIndex
from proxy.storage.index_janitor import IndexLedger
from proxy.storage.local import LocalVolume
from proxy.storage.tiered import TieredCache
from proxy.storage.volume_databricks import DatabricksVolume

log = logging.getLogger(__name__)

JanitorVolume = LocalVolume | DatabricksVolume
# A write in progress in another process leaves a temporary file or a lone object for seconds
# (bounded by the Volume timeout); anything untouched this long is a crash's leftover.
DEFAULT_LEFTOVER_GRACE_SECONDS: Final = 900.0
# Memory hits remembered between runs without an index; past it the oldest are forgotten.
MAX_RECORDED_HITS: Final = 50_000


@dataclass
class JanitorReport:
    """What one janitor run did; `elected` is False when it did nothing (another replica did)."""

    evicted_budget: int = 0
    evicted_ttl: int = 0
    evicted_quota: int = 0
    orphans_removed: int = 0
    bytes_freed: int = 0
    elected: bool = True
    duration: float = 0.0

    @property
    def evicted(self) -> int:
        """Entries evicted by any budget."""
        return self.evicted_budget + self.evicted_ttl + self.evicted_quota


class Ledger(Protocol):
    """Where the janitor reads sizes and hit times from: the index, or one walk of the Volume."""

    async def expired(self, before: float, limit: int) -> list[StoredEntryInfo]:
        """Entries last hit (or made, when never hit) before `before`, oldest first."""
        ...

    async def total_bytes(self) -> int:
        """The bytes of every entry."""
        ...

    async def users_over(self, quota: int, limit: int) -> list[tuple[str, int]]:
        """(user, bytes) of users over `quota`, the largest first."""
        ...

    async def oldest_of_user(self, user: str, limit: int) -> list[StoredEntryInfo]:
        """One user's entries, least recently hit first."""
        ...

    async def oldest(self, limit: int) -> list[StoredEntryInfo]:
        """Every entry, least recently hit first."""
        ...

    async def forget(self, entry: StoredEntryInfo) -> bool:
        """Drop an evicted entry from the ledger; True when it was there."""
        ...


@dataclass(frozen=True)
class VolumeSummary:
    """What the last walk of the Volume found (after its evictions): for stats without an index."""

    entries: int
    bytes: int
    top_users: tuple[tuple[str, int, int], ...]  # (user, entries, bytes), largest first


class WalkLedger:
    """A Ledger over one walk of the Volume, with the hits this process saw in memory."""

    def __init__(
        self, entries: Iterable[StoredEntryInfo], hits: Mapping[CacheKey, float] | None = None
    ) -> None:
        hits = hits or {}
        self._entries: dict[CacheKey, StoredEntryInfo] = {}
        for entry in entries:
            hit = hits.get(entry.key)
            if hit is not None and hit > entry.last_hit_at:
                entry = dataclasses.replace(entry, last_hit_at=hit)
            self._entries[entry.key] = entry

    async def expired(self, before: float, limit: int) -> list[StoredEntryInfo]:
        """Entries last hit before `before`, oldest first."""
        return [entry for entry in self._by_hit() if entry.last_hit_at < before][:limit]

    async def total_bytes(self) -> int:
        """The bytes of every entry walked."""
        return sum(entry.bytes for entry in self._entries.values())

    async def users_over(self, quota: int, limit: int) -> list[tuple[str, int]]:
        """(user, bytes) of users over `quota`, the largest first."""
        usage: Counter[str] = Counter()
        for entry in self._entries.values():
            usage[entry.key.user] += entry.bytes
        over = [(user, used) for user, used in usage.items() if used > quota]
        return sorted(over, key=lambda pair: (-pair[1], pair[0]))[:limit]

    async def oldest_of_user(self, user: str, limit: int) -> list[StoredEntryInfo]:
        """One user's entries, least recently hit first."""
        return [entry for entry in self._by_hit() if entry.key.user == user][:limit]

    async def oldest(self, limit: int) -> list[StoredEntryInfo]:
        """Every entry, least recently hit first."""
        return self._by_hit()[:limit]

    async def forget(self, entry: StoredEntryInfo) -> bool:
        """Drop an evicted entry."""
        return self._entries.pop(entry.key, None) is not None

    def _by_hit(self) -> list[StoredEntryInfo]:
        return sorted(self._entries.values(), key=_hit_order)

    def summary(self, top: int = 20) -> VolumeSummary:
        """Entries, bytes and the `top` users by bytes among what is left."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for entry in self._entries.values():
            counts[entry.key.user] += 1
            sizes[entry.key.user] += entry.bytes
        largest = sorted(sizes, key=lambda user: (-sizes[user], user))[:top]
        return VolumeSummary(
            entries=len(self._entries),
            bytes=sum(sizes.values()),
            top_users=tuple((user, counts[user], sizes[user]) for user in largest),
        )


class Janitor:
    """Evicts past the TTL, the user quota and the total budget, and removes crash leftovers.

    `run_once()` does one bounded run; `start()` runs one at once and then every
    `cache.janitor_interval_seconds` in a background task that logs, counts and survives
    failures; `aclose()` cancels it. Evictions go through the TieredCache (memory and Volume)
    and then the index.
    """

    def __init__(
        self,
        settings: CacheSettings,
        cache: TieredCache,
        volume: JanitorVolume | None,
        index: PostgresIndex | None,
        *,
        clock: Callable[[], float] = time.time,
        leftover_grace_seconds: float = DEFAULT_LEFTOVER_GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self.runs = 0
        self.errors = 0
        self.hits_dropped = 0
        self.last_report: JanitorReport | None = None
        self.last_walk: VolumeSummary | None = None
        self._cache = cache
        self._volume = volume
        self._index = index
        self._ledger = IndexLedger(index) if index is not None else None
        self._clock = clock
        self._grace = leftover_grace_seconds
        self._batch = settings.janitor_batch_size
        self._hits: OrderedDict[CacheKey, float] = OrderedDict()
        self._row_cursor: CacheKey | None = None
        # Decided once: record_hit runs on every memory hit.
        self._records_hits = index is None and self.enabled
        self._running = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """False without a Volume, or on one reached only with each user's own token."""
        if self._volume is None:
            return False
        # auth = "user": no token outside a request, so nothing could be walked or removed.
        return not (isinstance(self._volume, DatabricksVolume) and self._volume.auth == "user")

    def record_hit(self, key: CacheKey) -> None:
        """Note a hit the Volume did not see (a memory hit); no I/O. A no-op with an index."""
        if not self._records_hits:
            return
        hits = self._hits
        hits[key] = self._clock()
        # On the hit path: no reordering; when full, the earliest first-seen key is dropped.
        if len(hits) > MAX_RECORDED_HITS:
            hits.popitem(last=False)
            self.hits_dropped += 1

    def start(self) -> None:
        """Run now, then every janitor_interval_seconds, in a background task."""
        if self._task is not None:
            return
        if not self.enabled:
            log.warning(
                "janitor off: %s",
                "no Volume" if self._volume is None else "the Volume needs a user's token",
            )
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="janitor")

    async def aclose(self) -> None:
        """Cancel the background task and wait for it to stop."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})

    async def run_once(self) -> JanitorReport:
        """One bounded run; raises what stopped it (the background loop logs and counts that)."""
        async with self._running:
            started = time.monotonic()
            report = JanitorReport(elected=False)
            if self.enabled:
                if self._ledger is not None:
                    await self._run_indexed(self._ledger, report)
                else:
                    report.elected = True
                    await self._run_walking(report)
            report.duration = time.monotonic() - started
            self.runs += 1
            self.last_report = report
            _log_report(report)
            return report

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                self.errors += 1
                log.warning("janitor run failed: %s", type(exc).__name__)
            await asyncio.sleep(self.settings.janitor_interval_seconds)

    async def _run_indexed(self, ledger: IndexLedger, report: JanitorReport) -> None:
        assert self._index is not None
        if not self._index.available:
            log.debug("janitor run skipped: the index is unavailable")
            return
        async with ledger.elected() as election:
            if election is None:
                log.debug("janitor run skipped: another replica holds the lock")
                return
            report.elected = True
            # This replica's buffered hits must count before anything is chosen for eviction.
            with contextlib.suppress(IndexUnavailable):
                await self._index.flush()
            await self._clean_leftovers(report)
            if election.held:
                report.orphans_removed += await self._clean_rows(ledger)
            await self._apply_budgets(ledger, report, lambda: election.held)

    async def _run_walking(self, report: JanitorReport) -> None:
        await self._clean_leftovers(report)
        volume = self._volume
        assert volume is not None
        if isinstance(volume, LocalVolume) and self._hits:
            # Into the sidecars, so other processes and the next start see them too.
            seen = dict(self._hits)
            await volume.record_hits(seen)
            for key, at in seen.items():
                if self._hits.get(key) == at:
                    del self._hits[key]
        ledger = WalkLedger(await volume.scan(), self._hits)
        await self._apply_budgets(ledger, report, lambda: True)
        self.last_walk = ledger.summary()

    async def _clean_leftovers(self, report: JanitorReport) -> None:
        assert self._volume is not None
        older_than = self._clock() - self._grace
        report.orphans_removed += await self._volume.clean_orphans(
            limit=self._batch, older_than=older_than
        )

    async def _clean_rows(self, ledger: IndexLedger) -> int:
        """Forget one batch of index rows whose object is gone; the next run takes the next."""
        volume = self._volume
        assert volume is not None
        rows = await ledger.rows_after(self._row_cursor, self._batch)
        self._row_cursor = rows[-1].key if len(rows) >= self._batch else None
        forgotten = 0
        for row in rows:
            # An unreachable Volume raises here: only a definite "absent" forgets a row.
            if row.key.valid() and await volume.exists(row.key):
                continue
            if await ledger.forget(row):
                forgotten += 1
                log.debug("janitor forgot index row %s: no object", row.key.digest())
        return forgotten

    async def _apply_budgets(
        self, ledger: Ledger, report: JanitorReport, held: Callable[[], bool]
    ) -> None:
        budgets = self.settings.volume
        if budgets.ttl_seconds > 0 and held():
            await self._expire(ledger, report, self._clock() - budgets.ttl_seconds)
        if budgets.user_max_bytes > 0 and held():
            await self._enforce_quotas(ledger, report, budgets.user_max_bytes)
        if budgets.max_bytes > 0 and held():
            await self._enforce_budget(ledger, report, budgets.max_bytes)

    async def _expire(self, ledger: Ledger, report: JanitorReport, before: float) -> None:
        for entry in await ledger.expired(before, self._batch):
            if await self._evict(ledger, entry, "ttl"):
                report.evicted_ttl += 1
                report.bytes_freed += entry.bytes

    async def _enforce_quotas(self, ledger: Ledger, report: JanitorReport, quota: int) -> None:
        left = self._batch
        for user, used in await ledger.users_over(quota, self._batch):
            excess = used - quota
            for entry in await ledger.oldest_of_user(user, left):
                if excess <= 0 or left <= 0:
                    break
                left -= 1
                if await self._evict(ledger, entry, "quota"):
                    excess -= entry.bytes
                    report.evicted_quota += 1
                    report.bytes_freed += entry.bytes
            if left <= 0:
                return

    async def _enforce_budget(self, ledger: Ledger, report: JanitorReport, budget: int) -> None:
        excess = await ledger.total_bytes() - budget
        if excess <= 0:
            return
        for entry in await ledger.oldest(self._batch):
            if excess <= 0:
                return
            if await self._evict(ledger, entry, "budget"):
                excess -= entry.bytes
                report.evicted_budget += 1
                report.bytes_freed += entry.bytes

    async def _evict(self, ledger: Ledger, entry: StoredEntryInfo, reason: str) -> bool:
        """Remove one entry from memory and the Volume, then from the ledger (the index)."""
        volume = self._cache.volume
        failures = self._cache.errors[volume.name] if volume is not None else 0
        await self._cache.delete(entry.key)
        if volume is not None and self._cache.errors[volume.name] != failures:
            # The Volume may still hold it: its row stays, so the next run tries again.
            log.debug("janitor could not evict %s (%s)", entry.key.digest(), reason)
            return False
        await ledger.forget(entry)
        self._hits.pop(entry.key, None)
        log.debug("janitor evicted %s (%s)", entry.key.digest(), reason)
        return True


def _hit_order(entry: StoredEntryInfo) -> tuple[float, float, str, str, str, str]:
    key = entry.key
    return (
        entry.last_hit_at,
        entry.created_at,
        key.user,
        key.thread_id,
        key.message_id,
        key.voice,
    )


def _log_report(report: JanitorReport) -> None:
    level = logging.INFO if report.evicted or report.orphans_removed else logging.DEBUG
    log.log(
        level,
        "janitor run: %d evicted (ttl %d, quota %d, budget %d), %d leftovers, %d bytes freed,"
        " %.2fs, elected=%s",
        report.evicted,
        report.evicted_ttl,
        report.evicted_quota,
        report.evicted_budget,
        report.orphans_removed,
        report.bytes_freed,
        report.duration,
        report.elected,
    )
