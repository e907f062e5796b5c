"""MemoryTier: an in-process LRU of entries, bounded in bytes, with an optional TTL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from cachetools import LRUCache

from proxy.speak import CacheKey
from proxy.storage.base import Entry


class _Stored(NamedTuple):
    entry: Entry
    expires_at: float  # 0: never


def _stored_size(stored: _Stored) -> int:
    return stored.entry.size


class MemoryTier:
    """The fastest tier: recent entries in this process, least recently used evicted first."""

    name = "memory"

    def __init__(
        self,
        max_bytes: int,
        ttl_seconds: float,
        max_entry_bytes: int,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0 or ttl_seconds < 0 or max_entry_bytes < 0:
            raise ValueError("memory tier limits must be 0 or more")
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.max_entry_bytes = max_entry_bytes
        self._timer = timer
        # A plain LRU with the deadline beside each entry: cachetools' TTLCache does its timer
        # bookkeeping on every lookup, and lookups are the hot path.
        self._cache: LRUCache[CacheKey, _Stored] | None = (
            None if max_bytes == 0 else LRUCache(maxsize=max_bytes, getsizeof=_stored_size)
        )

    @property
    def enabled(self) -> bool:
        """False when max_bytes is 0: nothing is ever stored."""
        return self._cache is not None

    @property
    def current_bytes(self) -> int:
        """Bytes held by live entries (as counted by Entry.size)."""
        if self._cache is None:
            return 0
        self._expire()
        return int(self._cache.currsize)

    @property
    def entry_count(self) -> int:
        """How many live entries the tier holds."""
        if self._cache is None:
            return 0
        self._expire()
        return len(self._cache)

    def admits(self, entry: Entry) -> bool:
        """True when `entry` is small enough to be stored here."""
        return (
            self._cache is not None
            and len(entry.body) <= self.max_entry_bytes
            and entry.size <= self.max_bytes
        )

    def get_nowait(self, key: CacheKey) -> Entry | None:
        """The live entry under `key`, or None; marks it most recently used."""
        cache = self._cache
        if cache is None:
            return None
        stored = cache.get(key)
        if stored is None:
            return None
        if stored.expires_at and self._timer() >= stored.expires_at:
            cache.pop(key, None)
            return None
        return stored.entry

    def put_nowait(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry`, evicting least recently used entries to stay within max_bytes."""
        if self._cache is None:
            return
        if not self.admits(entry):
            # The older entry is for other text or an older recording: keeping it would serve stale
            # audio for a key the caller has just replaced.
            self._cache.pop(key, None)
            return
        expires_at = self._timer() + self.ttl_seconds if self.ttl_seconds else 0.0
        self._cache[key] = _Stored(entry, expires_at)

    def delete_nowait(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        if self._cache is not None:
            self._cache.pop(key, None)

    def delete_where(self, predicate: Callable[[CacheKey], bool]) -> int:
        """Remove every live entry whose key satisfies `predicate`; return how many."""
        if self._cache is None:
            return 0
        self._expire()
        doomed = [key for key in list(self._cache.keys()) if predicate(key)]
        for key in doomed:
            self._cache.pop(key, None)
        return len(doomed)

    def clear(self) -> None:
        """Drop every entry."""
        if self._cache is not None:
            self._cache.clear()

    async def get(self, key: CacheKey) -> Entry | None:
        """The live entry under `key`, or None."""
        return self.get_nowait(key)

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key` (see put_nowait)."""
        self.put_nowait(key, entry)

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        self.delete_nowait(key)

    async def aclose(self) -> None:
        """Drop every entry; the tier holds nothing else open."""
        self.clear()

    def _expire(self) -> None:
        # Expired entries still count towards currsize and len() until they are swept.
        cache = self._cache
        if cache is None or not self.ttl_seconds:
            return
        now = self._timer()
        for key in [k for k, stored in cache.items() if stored.expires_at <= now]:
            cache.pop(key, None)
