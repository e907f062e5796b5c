"""MemoryTier: an in-process LRU of entries, bounded in bytes, with an optional TTL."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import Cache, LRUCache, TTLCache

from proxy.speak import CacheKey
from proxy.storage.base import Entry


def _entry_size(entry: Entry) -> int:
    return entry.size


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
        self._cache: Cache[CacheKey, Entry] | None
        if max_bytes == 0:
            self._cache = None
        elif ttl_seconds == 0:
            self._cache = LRUCache(maxsize=max_bytes, getsizeof=_entry_size)
        else:
            self._cache = TTLCache(
                maxsize=max_bytes, ttl=ttl_seconds, timer=timer, getsizeof=_entry_size
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
        if self._cache is None:
            return None
        return self._cache.get(key)

    def put_nowait(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry`, evicting least recently used entries to stay within max_bytes."""
        if self._cache is None:
            return
        if not self.admits(entry):
            # The older entry is for other text or an older recording: keeping it would serve stale
            # audio for a key the caller has just replaced.
            self._cache.pop(key, None)
            return
        self._cache[key] = entry

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
        if isinstance(self._cache, TTLCache):
            self._cache.expire()
