"""The janitor: keeps the Volume within its budgets and free of crash leftovers, off requests.

Each run, in order: crash leftovers on the Volume (and, with an index, rows whose object is gone),
then entries idle past `cache.volume.ttl_seconds`, then each user's least recently hit entries past
`cache.volume.user_max_bytes`, then the fleet's least recently hit entries past
`cache.volume.max_bytes`, then (when lookups go through the index) the next part of the walk that
records the Volume's entries in the index (`proxy/index/backfill.py`). Every step does at most
`cache.janitor_batch_size` removals (or walked entries) a run; what is left waits for the next run.

With a PostgreSQL index the figures come from the index and one replica (the holder of a lease in
the index, `index/lease.py`) does the work for the fleet, confirming the lease before each
deletion. Without one, a run that has a budget to keep walks the Volume: a local Volume's last hit
is its sidecar's mtime; a Databricks Volume keeps no access times, so there an entry is idle since
it was written, unless this process saw it hit in memory (`record_hit`). Without a budget (the
default) no run walks every entry: leftovers are looked for in a bounded walk that resumes where
the last run stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from proxy.config import CacheSettings
from proxy.index.backfill import IndexBackfill
from proxy.index.entries import PostgresIndex
from proxy.index.lease import DEFAULT_LEASE_SECONDS
from proxy.index.ledger import IndexLedger
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import DurableTier
from proxy.storage.volumes import backstop_seconds
from proxy.walk_ledger import Ledger, VolumeSummary, WalkLedger

log = logging.getLogger(__name__)

# A write in progress in another process leaves a temporary file or a lone object for seconds
# (bounded by the Volume timeout); anything untouched this long is a crash's leftover.
DEFAULT_LEFTOVER_GRACE_SECONDS: Final = 900.0
# Memory hits remembered between runs without an index; past it the oldest are forgotten.
MAX_RECORDED_HITS: Final = 50_000
# Without an index, budgets are kept by walking every entry on each run: past this many entries
# each run says so (bench/README.md, "Cost as the Volume grows": a Files API walk of 10,000
# entries is about 3,400 listings, 40 s of a replica's call budget).
WALK_WARNING_ENTRIES: Final = 10_000

# Asked before each deletion: may this process delete now?
MayDelete = Callable[[], Awaitable[bool]]


async def _always() -> bool:
    return True


def janitor_lease_seconds(settings: CacheSettings) -> float:
    """How long the janitor's lease lasts.

    It is renewed when half has gone, so a deletion started under it (bounded by the Volume's
    backstop) ends with at least one more deletion's time to spare before it can expire.
    """
    return max(DEFAULT_LEASE_SECONDS, 4 * backstop_seconds(settings.volume))


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
    index_walked: int = 0
    index_recorded: int = 0

    @property
    def evicted(self) -> int:
        """Entries evicted by any budget."""
        return self.evicted_budget + self.evicted_ttl + self.evicted_quota


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
        volume: DurableTier | None,
        index: PostgresIndex | None,
        *,
        clock: Callable[[], float] = time.time,
        leftover_grace_seconds: float = DEFAULT_LEFTOVER_GRACE_SECONDS,
        lease_seconds: float | None = None,
        backfill: IndexBackfill | None = None,
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
        self._ledger = (
            IndexLedger(index.pool, lease_seconds=lease_seconds or janitor_lease_seconds(settings))
            if index is not None
            else None
        )
        self._backfill = backfill if index is not None else None
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
    def has_budget(self) -> bool:
        """True when a Volume budget is set (a TTL, a user quota or a total)."""
        budgets = self.settings.volume
        return budgets.ttl_seconds > 0 or budgets.user_max_bytes > 0 or budgets.max_bytes > 0

    @property
    def enabled(self) -> bool:
        """False without a Volume, or on one reached only with each user's own token."""
        return self._volume is not None and self._volume.walkable

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
        async with ledger.elected() as lease:
            if lease is None:
                log.debug("janitor run skipped: another replica holds the lease")
                return
            report.elected = True
            # This replica's buffered hits must count before anything is chosen for eviction.
            with contextlib.suppress(IndexUnavailable):
                await self._index.flush()
            # Leftovers go in one Volume call: confirmed before it (removing one twice is
            # harmless); every eviction and forgotten row is confirmed on its own.
            if await lease.confirm():
                await self._clean_leftovers(report)
            if await lease.confirm():
                report.orphans_removed += await self._clean_rows(ledger, lease.confirm)
            await self._apply_budgets(ledger, report, lease.confirm)
            if self._backfill is not None and await lease.confirm():
                step = await self._backfill.step(self._batch)
                report.index_walked, report.index_recorded = step.walked, step.recorded

    async def _run_walking(self, report: JanitorReport) -> None:
        await self._clean_leftovers(report)
        volume = self._volume
        assert volume is not None
        if not self.has_budget:
            # Nothing to enforce: no walk of every entry (its cost grows with the Volume).
            return
        if self._hits:
            # Into the Volume where it keeps hit times, so other processes and the next start
            # see them too; otherwise they stay here for the walk ledger.
            seen = dict(self._hits)
            if await volume.record_hits(seen):
                for key, at in seen.items():
                    if self._hits.get(key) == at:
                        del self._hits[key]
        started = time.monotonic()
        ledger = WalkLedger(await volume.scan(), self._hits)
        await self._apply_budgets(ledger, report, _always)
        self.last_walk = ledger.summary()
        if self.last_walk.entries > WALK_WARNING_ENTRIES:
            log.warning(
                "janitor: the Volume's budgets took a walk of all its %d entries (%.1fs); past "
                "%d entries keep them with the index (index.dsn), which needs no walk",
                self.last_walk.entries,
                time.monotonic() - started,
                WALK_WARNING_ENTRIES,
            )

    async def _clean_leftovers(self, report: JanitorReport) -> None:
        assert self._volume is not None
        older_than = self._clock() - self._grace
        report.orphans_removed += await self._volume.clean_orphans(
            limit=self._batch, older_than=older_than
        )

    async def _clean_rows(self, ledger: IndexLedger, may_delete: MayDelete) -> int:
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
            if not await may_delete():
                break
            if await ledger.forget(row):
                forgotten += 1
                log.debug("janitor forgot index row %s: no object", row.key.digest())
        return forgotten

    async def _apply_budgets(
        self, ledger: Ledger, report: JanitorReport, may_delete: MayDelete
    ) -> None:
        budgets = self.settings.volume
        if budgets.ttl_seconds > 0 and await may_delete():
            await self._expire(ledger, report, self._clock() - budgets.ttl_seconds, may_delete)
        if budgets.user_max_bytes > 0 and await may_delete():
            await self._enforce_quotas(ledger, report, budgets.user_max_bytes, may_delete)
        if budgets.max_bytes > 0 and await may_delete():
            await self._enforce_budget(ledger, report, budgets.max_bytes, may_delete)

    async def _expire(
        self, ledger: Ledger, report: JanitorReport, before: float, may_delete: MayDelete
    ) -> None:
        for entry in await ledger.expired(before, self._batch):
            if not await may_delete():
                return
            if await self._evict(ledger, entry, "ttl"):
                report.evicted_ttl += 1
                report.bytes_freed += entry.bytes

    async def _enforce_quotas(
        self, ledger: Ledger, report: JanitorReport, quota: int, may_delete: MayDelete
    ) -> None:
        left = self._batch
        for user, used in await ledger.users_over(quota, self._batch):
            excess = used - quota
            for entry in await ledger.oldest_of_user(user, left):
                if excess <= 0 or left <= 0:
                    break
                if not await may_delete():
                    return
                left -= 1
                if await self._evict(ledger, entry, "quota"):
                    excess -= entry.bytes
                    report.evicted_quota += 1
                    report.bytes_freed += entry.bytes
            if left <= 0:
                return

    async def _enforce_budget(
        self, ledger: Ledger, report: JanitorReport, budget: int, may_delete: MayDelete
    ) -> None:
        excess = await ledger.total_bytes() - budget
        if excess <= 0:
            return
        for entry in await ledger.oldest(self._batch):
            if excess <= 0 or not await may_delete():
                return
            if await self._evict(ledger, entry, "budget"):
                excess -= entry.bytes
                report.evicted_budget += 1
                report.bytes_freed += entry.bytes

    async def _evict(self, ledger: Ledger, entry: EntryInfo, reason: str) -> bool:
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


def _log_report(report: JanitorReport) -> None:
    acted = report.evicted or report.orphans_removed or report.index_recorded
    log.log(
        logging.INFO if acted else logging.DEBUG,
        "janitor run: %d evicted (ttl %d, quota %d, budget %d), %d leftovers, %d bytes freed,"
        " %d walked into the index (%d recorded), %.2fs, elected=%s",
        report.evicted,
        report.evicted_ttl,
        report.evicted_quota,
        report.evicted_budget,
        report.orphans_removed,
        report.bytes_freed,
        report.index_walked,
        report.index_recorded,
        report.duration,
        report.elected,
    )
