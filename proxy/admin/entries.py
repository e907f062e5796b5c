"""What the cache holds, for the dashboard: from the index, else a Volume scan plus memory."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from proxy.index.entries import PostgresIndex
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo, EntryMeta
from proxy.storage.scope import Scope
from proxy.storage.tiered import TieredCache
from proxy.walk_ledger import VolumeSummary, WalkLedger

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 25
SCAN_MAX_AGE_SECONDS: Final = 10.0
SCAN_TIMEOUT_SECONDS: Final = 30.0
# Without an index, the totals that stats and metrics report come from a walk of every entry,
# repeated as they are read. Only a local Volume is walked for them, and only while its last walk
# counted at most this many (bench/README.md, "Cost as the Volume grows": 0.2 s at 10,000, 2.2 s
# at 100,000): a Files API walk costs a listing per folder from the replica's call budget (10,000
# entries: 4,385 calls, a minute of it). Past that, the index reports them.
TOTALS_WALK_LIMIT: Final = 10_000


@dataclass(frozen=True, slots=True)
class EntryPage:
    """One page of rows, where they came from, and whether another page follows."""

    rows: list[EntryInfo]
    page: int
    has_next: bool
    source: str
    notice: str | None = None


class EntryBrowser:
    """Lists entries: the PostgreSQL index when configured and up, else a cached Volume scan."""

    def __init__(
        self,
        cache: TieredCache,
        index: PostgresIndex | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.index = index
        self._clock = clock
        self._scan: list[EntryInfo] | None = None
        self._scanned_at = 0.0

    async def page(self, wanted: Scope, page: int, size: int = PAGE_SIZE) -> EntryPage:
        """Rows `page * size` onwards, newest first."""
        notice = None
        if self.index is not None:
            try:
                return await self._indexed(wanted, page, size)
            except IndexUnavailable:
                notice = "The index is unavailable: listing the Volume and memory instead."
        rows = await self._walked(wanted)
        chosen = [self._with_memory_meta(row) for row in rows[page * size : (page + 1) * size]]
        source = "volume scan" if self.cache.volume is not None else "memory"
        filled = await self._with_providers(chosen)
        return EntryPage(filled, page, len(rows) > (page + 1) * size, source, notice)

    async def find(self, key: CacheKey) -> EntryInfo | None:
        """The row of one entry, or None when nothing is stored under `key`."""
        found = await self.page(Scope.of(key), 0, size=1)
        return found.rows[0] if found.rows else None

    async def volume_totals(self) -> VolumeSummary | None:
        """The Volume's entries, bytes and largest users from a scan (cached briefly); None
        without a Volume, or where a walk for them costs too much (TOTALS_WALK_LIMIT)."""
        volume = self.cache.volume
        if volume is None or volume.kind != "local":
            return None
        fresh = self._scan is not None and self._clock() - self._scanned_at <= SCAN_MAX_AGE_SECONDS
        if self._scan is not None and len(self._scan) > TOTALS_WALK_LIMIT and not fresh:
            return None
        return WalkLedger(await self._scanned()).summary()

    def forget_scan(self) -> None:
        """Drop the cached scan (after a purge, so the next listing is fresh)."""
        self._scan = None

    async def _indexed(self, wanted: Scope, page: int, size: int) -> EntryPage:
        assert self.index is not None
        found = await self.index.list_entries(
            wanted.user,
            wanted.thread_id,
            wanted.message_id,
            wanted.voice,
            limit=size + 1,
            offset=page * size,
        )
        memory = self._memory_keys()
        rows = [dataclasses.replace(e, in_memory=e.key in memory) for e in found[:size]]
        return EntryPage(rows, page, len(found) > size, "index")

    async def _walked(self, wanted: Scope) -> list[EntryInfo]:
        """Scanned entries newest first, then memory-only ones (no Volume, or a write pending)."""
        memory = self._memory_keys()
        rows: dict[CacheKey, EntryInfo] = {}
        for info in await self._scanned():
            if wanted.covers(info.key):
                rows[info.key] = dataclasses.replace(
                    info, provider=None, hits=None, in_memory=info.key in memory
                )
        scanned = sorted(rows.values(), key=lambda row: (-row.created_at, _sort_key(row.key)))
        # Their metadata is read only for the page shown: a read marks an entry recently used.
        only_memory = sorted(
            (k for k in memory if k not in rows and wanted.covers(k)), key=_sort_key
        )
        return scanned + [EntryInfo(k, 0, 0.0, 0.0, in_memory=True) for k in only_memory]

    async def _scanned(self) -> list[EntryInfo]:
        volume = self.cache.volume
        if volume is None:
            return []
        if self._scan is None or self._clock() - self._scanned_at > SCAN_MAX_AGE_SECONDS:
            try:
                async with asyncio.timeout(SCAN_TIMEOUT_SECONDS):
                    found = await volume.scan()
            except Exception as exc:
                log.warning("volume scan for the dashboard failed: %s", type(exc).__name__)
                return self._scan or []
            self._scan, self._scanned_at = found, self._clock()
        return self._scan

    def _memory_keys(self) -> set[CacheKey]:
        """Every key in the memory tier, without touching its LRU order or removing anything."""
        memory = self.cache.memory
        keys: set[CacheKey] = set()

        def note(key: CacheKey) -> bool:
            keys.add(key)
            return False  # keep it

        if memory is not None:
            # delete_where is the tier's one public walk; a predicate that says no removes nothing.
            memory.delete_where(note)
        return keys

    def _with_memory_meta(self, row: EntryInfo) -> EntryInfo:
        """A memory-only row completed from the entry's metadata."""
        memory = self.cache.memory
        if row.created_at or memory is None:
            return row
        entry = memory.get_nowait(row.key)
        if entry is None:
            return row
        meta = entry.meta
        return EntryInfo(
            row.key,
            meta.length,
            meta.created_at,
            0.0,
            provider=meta.provider,
            in_memory=True,
        )

    async def _with_providers(self, rows: list[EntryInfo]) -> list[EntryInfo]:
        """Fill in the provider from the Volume's sidecars (one page of reads)."""
        volume = self.cache.volume
        if volume is None or not rows:
            return rows
        filled: list[EntryInfo] = []
        for row in rows:
            if row.provider is None and row.created_at:
                meta = await _quietly(volume.read_meta(row.key))
                if meta is not None:
                    row = dataclasses.replace(row, provider=meta.provider)
            filled.append(row)
        return filled


async def _quietly(read: Awaitable[EntryMeta | None]) -> EntryMeta | None:
    """A sidecar read for the listing; a failure only leaves the provider unknown."""
    try:
        return await read
    except Exception as exc:
        log.debug("sidecar read for the entry listing failed: %s", type(exc).__name__)
        return None


def _sort_key(key: CacheKey) -> tuple[str, str, str, str]:
    return (key.user, key.thread_id, key.message_id, key.voice)
