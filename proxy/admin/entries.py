"""What the cache holds, for the dashboard: from the index, else a Volume scan plus memory."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.speak import CacheKey, valid_id
from proxy.storage.entry import EntryInfo as StoredEntryInfo
from proxy.storage.entry import EntryMeta
from proxy.storage.index import IndexedEntry, IndexUnavailable, PostgresIndex
from proxy.storage.layout import SIDECAR_SUFFIX
from proxy.storage.local import LocalVolume
from proxy.storage.tiered import TieredCache

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 25
SCAN_MAX_AGE_SECONDS: Final = 10.0
SCAN_TIMEOUT_SECONDS: Final = 30.0


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """A prefix of user / thread / message / voice; each part a valid id or None."""

    user: str | None = None
    thread: str | None = None
    message: str | None = None
    voice: str | None = None

    @classmethod
    def parse(cls, values: dict[str, str]) -> EntryFilter:
        """From query parameters; empty or invalid parts are dropped."""

        def part(name: str) -> str | None:
            value = values.get(name, "").strip()
            return value if valid_id(value) else None

        return cls(part("user"), part("thread"), part("message"), part("voice"))

    def covers(self, key: CacheKey) -> bool:
        """True when `key` matches every part that is set."""
        pairs = (
            (self.user, key.user),
            (self.thread, key.thread_id),
            (self.message, key.message_id),
            (self.voice, key.voice),
        )
        return all(wanted is None or wanted == actual for wanted, actual in pairs)

    def query(self) -> dict[str, str]:
        """The parts that are set, as query parameters."""
        named = {"user": self.user, "thread": self.thread}
        named.update(message=self.message, voice=self.voice)
        return {name: value for name, value in named.items() if value is not None}


@dataclass(frozen=True, slots=True)
class EntryRow:
    """One cached entry as the dashboard lists it; None where the source does not know."""

    key: CacheKey
    bytes: int
    provider: str | None
    created_at: float
    last_hit_at: float | None
    hits: int | None
    in_memory: bool


@dataclass(frozen=True, slots=True)
class EntryPage:
    """One page of rows, where they came from, and whether another page follows."""

    rows: list[EntryRow]
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
        self._scan: list[StoredEntryInfo] | None = None
        self._scanned_at = 0.0

    async def page(self, wanted: EntryFilter, page: int, size: int = PAGE_SIZE) -> EntryPage:
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

    async def find(self, key: CacheKey) -> EntryRow | None:
        """The row of one entry, or None when nothing is stored under `key`."""
        wanted = EntryFilter(key.user, key.thread_id, key.message_id, key.voice)
        found = await self.page(wanted, 0, size=1)
        return found.rows[0] if found.rows else None

    async def volume_totals(self) -> tuple[int, int] | None:
        """(entries, bytes) on the Volume from a scan (cached briefly); None without one."""
        if getattr(self.cache.volume, "scan", None) is None:
            return None
        found = await self._scanned()
        return len(found), sum(info.bytes for info in found)

    def forget_scan(self) -> None:
        """Drop the cached scan (after a purge, so the next listing is fresh)."""
        self._scan = None

    async def _indexed(self, wanted: EntryFilter, page: int, size: int) -> EntryPage:
        assert self.index is not None
        found = await self.index.list_entries(
            wanted.user,
            wanted.thread,
            wanted.message,
            wanted.voice,
            limit=size + 1,
            offset=page * size,
        )
        memory = self._memory_keys()
        rows = [_indexed_row(entry, entry.key in memory) for entry in found[:size]]
        return EntryPage(rows, page, len(found) > size, "index")

    async def _walked(self, wanted: EntryFilter) -> list[EntryRow]:
        """Scanned entries newest first, then memory-only ones (no Volume, or a write pending)."""
        memory = self._memory_keys()
        rows: dict[CacheKey, EntryRow] = {}
        for info in await self._scanned():
            if wanted.covers(info.key):
                rows[info.key] = EntryRow(
                    info.key,
                    info.bytes,
                    None,
                    info.created_at,
                    info.last_hit_at,
                    None,
                    info.key in memory,
                )
        scanned = sorted(rows.values(), key=lambda row: (-row.created_at, _sort_key(row.key)))
        # Their metadata is read only for the page shown: a read marks an entry recently used.
        only_memory = sorted(
            (k for k in memory if k not in rows and wanted.covers(k)), key=_sort_key
        )
        return scanned + [EntryRow(k, 0, None, 0.0, None, None, True) for k in only_memory]

    async def _scanned(self) -> list[StoredEntryInfo]:
        scan = getattr(self.cache.volume, "scan", None)
        if scan is None:
            return []
        if self._scan is None or self._clock() - self._scanned_at > SCAN_MAX_AGE_SECONDS:
            try:
                async with asyncio.timeout(SCAN_TIMEOUT_SECONDS):
                    found: list[StoredEntryInfo] = await scan()
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

    def _with_memory_meta(self, row: EntryRow) -> EntryRow:
        """A memory-only row completed from the entry's metadata."""
        memory = self.cache.memory
        if row.created_at or memory is None:
            return row
        entry = memory.get_nowait(row.key)
        if entry is None:
            return row
        meta = entry.meta
        return EntryRow(row.key, meta.length, meta.provider, meta.created_at, None, None, True)

    async def _with_providers(self, rows: list[EntryRow]) -> list[EntryRow]:
        """Fill in the provider from the sidecars of a local Volume (one page of reads)."""
        volume = self.cache.volume
        if not isinstance(volume, LocalVolume) or not rows:
            return rows
        base = volume.base
        providers = await asyncio.to_thread(
            lambda: [row.provider or _sidecar_provider(base, row.key) for row in rows]
        )
        return [
            EntryRow(r.key, r.bytes, p, r.created_at, r.last_hit_at, r.hits, r.in_memory)
            for r, p in zip(rows, providers, strict=True)
        ]


def _indexed_row(entry: IndexedEntry, in_memory: bool) -> EntryRow:
    return EntryRow(
        entry.key,
        entry.bytes,
        entry.provider,
        entry.created_at.timestamp(),
        entry.last_hit_at.timestamp(),
        entry.hits,
        in_memory,
    )


def _sidecar_provider(base: Path, key: CacheKey) -> str | None:
    """The provider recorded in an entry's sidecar, or None (runs in a worker thread)."""
    path = base / key.user / key.thread_id / key.message_id / f"{key.voice}{SIDECAR_SUFFIX}"
    try:
        data = json.loads(path.read_bytes())
        meta = EntryMeta.from_json(data) if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if meta is None:
        return None
    return meta.provider


def _sort_key(key: CacheKey) -> tuple[str, str, str, str]:
    return (key.user, key.thread_id, key.message_id, key.voice)
