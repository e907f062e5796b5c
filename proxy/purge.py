"""Purge: remove one voice, a message, a thread, a user or everything, from every place it lives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from proxy.fill import Flights
from proxy.fleet.broadcast import Broadcast, Confirmation
from proxy.index.entries import PostgresIndex
from proxy.index.pool import IndexUnavailable
from proxy.ownership import OwnershipCheck
from proxy.speak import CacheKey
from proxy.storage.scope import Scope
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import DurableTier

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """How many entries went from each place; `removed` is the most any one place held."""

    memory: int
    volume: int
    index: int
    fills_cancelled: int
    # Who else dropped it: the other workers and replicas (None: nothing to tell anyone).
    processes: Confirmation | None = None

    @property
    def removed(self) -> int:
        """Entries removed (each stored entry lives in memory, the Volume and the index)."""
        return max(self.memory, self.volume, self.index)

    def to_json(self) -> dict[str, Any]:
        """The admin API's answer."""
        answer: dict[str, Any] = {
            "removed": self.removed,
            "memory": self.memory,
            "volume": self.volume,
            "index": self.index,
            "fills_cancelled": self.fills_cancelled,
        }
        if self.processes is not None:
            answer["processes"] = self.processes.to_json()
        return answer


async def purge(
    scope: Scope,
    *,
    cache: TieredCache,
    flights: Flights | None,
    index: PostgresIndex | None,
    ownership: OwnershipCheck | None = None,
    broadcast: Broadcast | None = None,
) -> PurgeResult:
    """Remove everything inside `scope`; a fill in flight for it is served but not stored.

    This process first, then the Volume and the index, then every other process (`broadcast`):
    told after the Volume is clear, another process cannot read the entry back into memory.
    """
    cancelled = flights.cancel_store(scope.covers) if flights is not None else 0
    memory = (await cache.purge_where(scope.covers)).memory
    volume = await _purge_volume(scope, cache)
    removed_rows = await _purge_index(scope, index)
    if ownership is not None and scope.user is not None:
        ownership.forget(scope.user)
    processes = await broadcast.invalidate(scope) if broadcast is not None else None
    result = PurgeResult(memory, volume, removed_rows, cancelled, processes)
    log.info("purge removed %s", result.to_json())
    return result


async def _purge_volume(scope: Scope, cache: TieredCache) -> int:
    volume = cache.volume
    if volume is None:
        return 0
    if scope.voice is not None:
        assert scope.user and scope.thread_id and scope.message_id
        key = CacheKey(scope.user, scope.thread_id, scope.message_id, scope.voice)
        existed = await volume.exists(key)  # not get(): no need to read and hash the body
        await volume.delete(key)
        return int(existed)
    if scope.user is not None:
        return await volume.delete_prefix(scope.user, scope.thread_id, scope.message_id)
    total = 0
    for user in await _volume_users(volume):
        total += await volume.delete_prefix(user)
    return total


async def _volume_users(volume: DurableTier) -> list[str]:
    """Every user with an entry on the Volume, for a purge of everything."""
    return sorted({listed.key.user async for listed in volume.list_entries()})


async def _purge_index(scope: Scope, index: PostgresIndex | None) -> int:
    if index is None:
        return 0
    try:
        if scope.voice is not None:
            assert scope.user and scope.thread_id and scope.message_id
            key = CacheKey(scope.user, scope.thread_id, scope.message_id, scope.voice)
            return int(await index.remove(key))
        if scope.user is not None:
            return await index.remove_prefix(scope.user, scope.thread_id, scope.message_id)
        return await index.remove_all()
    except IndexUnavailable:
        log.warning("purge: the index is unavailable; its rows are left for the janitor")
        return 0
