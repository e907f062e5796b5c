"""LocalInvalidations: an invalidation applied to this process, once, however often it arrives."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Final

from proxy.fill import Flights
from proxy.fleet.messages import PURGE, Invalidation
from proxy.index.entries import PostgresIndex
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from proxy.storage.scope import Scope
from proxy.storage.tiered import TieredCache

log = logging.getLogger(__name__)

# Message ids remembered, so a message that comes over both buses is applied once.
SEEN_IDS: Final = 4_096


class LocalInvalidations:
    """Drops what an invalidation names from this process: memory, pending writes, and the
    right to store for fills in flight.

    A purge's origin removes the Volume objects and index rows before it broadcasts; a write of
    this process that was already out may land after that removal, so the keys whose write a
    purge waited for are removed here once more (Volume, then index).
    """

    def __init__(
        self,
        cache: TieredCache,
        flights: Flights | None,
        *,
        index: PostgresIndex | None = None,
    ) -> None:
        self.cache = cache
        self.flights = flights
        self.index = index
        self.applied: Counter[str] = Counter()
        # Whole memory tiers dropped because this process may have missed invalidations.
        self.flushes = 0
        self._seen: OrderedDict[str, asyncio.Task[None]] = OrderedDict()
        # Told of every new recording on the Volume: another process's (a stored notice) and
        # this one's (`own`); one fill per key across replicas waits for them.
        self.stored_listeners: list[Callable[[CacheKey, bool], None]] = []

    def note_stored(self, key: CacheKey, own: bool) -> None:
        """A new recording of `key` is on the Volume: tell the listeners."""
        for listener in self.stored_listeners:
            listener(key, own)

    async def apply(self, message: Invalidation) -> None:
        """Apply `message` unless it was already; a second delivery waits for the first."""
        task = self._seen.get(message.id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._apply(message))
            self._seen[message.id] = task
            if len(self._seen) > SEEN_IDS:
                self._seen.popitem(last=False)
        # Shielded: a caller that goes away (a sibling's request cut) leaves the work running.
        await asyncio.shield(task)

    async def flush(self, reason: str) -> int:
        """Drop the whole memory tier and forbid storing every fill in flight; one log line."""
        self.flushes += 1
        purged = await self._drop(Scope(everything=True))
        log.warning("memory tier dropped (%d entries): %s", purged, reason)
        return purged

    async def _apply(self, message: Invalidation) -> None:
        self.applied[message.kind] += 1
        if message.kind == PURGE:
            assert message.scope is not None
            await self._drop(message.scope)
            return
        for key, body_sha256 in message.stored:
            self.cache.invalidate_key(key, keep_body_sha256=body_sha256)
            self.note_stored(key, own=False)

    async def _drop(self, scope: Scope) -> int:
        if self.flights is not None:
            self.flights.cancel_store(scope.covers)
        purged = await self.cache.purge_where(scope.covers)
        for key in purged.written:
            await self._remove_stored(key)
        return purged.memory

    async def _remove_stored(self, key: CacheKey) -> None:
        """A key this process wrote while a purge covering it went on elsewhere: remove it."""
        volume = self.cache.volume
        if volume is not None:
            try:
                await volume.delete(key)
            except Exception as exc:
                self.cache.count_error(volume.name, "delete", key, exc)
        if self.index is not None:
            try:
                await self.index.remove(key)
            except IndexUnavailable:
                log.warning("purge: index row of %s left for the janitor", key.digest())
