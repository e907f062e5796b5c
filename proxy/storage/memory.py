"""MemoryTier: an in-process LRU of entries, bounded in bytes, with an optional TTL."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from proxy.speak import CacheKey
from proxy.storage.entry import Entry


class _Stored(NamedTuple):
    entry: Entry
    expires_at: float  # 0: never


class MemoryTier:
    """The fastest tier: recent entries in this process, least recently used evicted first."""

    name = "memory"

    def __init__(
        self,
        max_bytes: int,
        ttl_seconds: float,
        max_entry_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 0 or ttl_seconds < 0 or max_entry_bytes < 0:
            raise ValueError("memory tier limits must be 0 or more")
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.max_entry_bytes = max_entry_bytes
        self._clock = clock
        # An LRU in one OrderedDict (least recently used first) with the deadline beside each
        # entry: a hit, the hot path, is one lookup and one move_to_end, both in C.
        self._cache: OrderedDict[CacheKey, _Stored] | None = (
            None if max_bytes == 0 else OrderedDict()
        )
        self._bytes = 0  # the sum of entry.size over self._cache

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
        return self._bytes

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
        if stored.expires_at and self._clock() >= stored.expires_at:
            self._remove(key)
            return None
        cache.move_to_end(key)
        return stored.entry

    def put_nowait(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry`, evicting least recently used entries to stay within max_bytes."""
        if self._cache is None:
            return
        # The older entry is for other text or an older recording: keeping it would serve stale
        # audio for a key the caller has just replaced, whether or not the new one fits.
        self._remove(key)
        if not self.admits(entry):
            return
        cache = self._cache
        excess = self._bytes + entry.size - self.max_bytes
        while excess > 0 and cache:
            _, evicted = cache.popitem(last=False)
            self._bytes -= evicted.entry.size
            excess -= evicted.entry.size
        expires_at = self._clock() + self.ttl_seconds if self.ttl_seconds else 0.0
        cache[key] = _Stored(entry, expires_at)
        self._bytes += entry.size

    def delete_nowait(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        self._remove(key)

    def _remove(self, key: CacheKey) -> None:
        if self._cache is None:
            return
        stored = self._cache.pop(key, None)
        if stored is not None:
            self._bytes -= stored.entry.size

    def delete_where(self, predicate: Callable[[CacheKey], bool]) -> int:
        """Remove every live entry whose key satisfies `predicate`; return how many."""
        if self._cache is None:
            return 0
        self._expire()
        doomed = [key for key in self._cache if predicate(key)]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def clear(self) -> None:
        """Drop every entry."""
        if self._cache is not None:
            self._cache.clear()
            self._bytes = 0

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
        # Expired entries still count towards the bytes and len() until they are swept.
        cache = self._cache
        if cache is None or not self.ttl_seconds:
            return
        now = self._clock()
        for key in [k for k, stored in cache.items() if stored.expires_at <= now]:
            self._remove(key)
