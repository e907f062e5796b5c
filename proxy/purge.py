"""Purge: remove one voice, a message, a thread, a user or everything, from every place it lives."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from proxy.fill import Flights
from proxy.index.entries import PostgresIndex
from proxy.index.pool import IndexUnavailable
from proxy.ownership import OwnershipCheck
from proxy.speak import CacheKey, valid_id
from proxy.storage.tiered import TieredCache

log = logging.getLogger(__name__)


class BadScope(ValueError):
    """The purge scope is not a valid prefix of user / thread / message / voice."""


@dataclass(frozen=True, slots=True)
class PurgeScope:
    """A prefix of the entry path; all None with `everything` means the whole cache."""

    user: str | None = None
    thread_id: str | None = None
    message_id: str | None = None
    voice: str | None = None
    everything: bool = False

    @classmethod
    def parse(
        cls,
        *,
        user: str | None,
        thread_id: str | None = None,
        message_id: str | None = None,
        voice: str | None = None,
        everything: bool = False,
    ) -> PurgeScope:
        """Validate a scope: a prefix in order, valid ids, or `everything` alone."""
        parts = [user, thread_id, message_id, voice]
        given = [p for p in parts if p is not None]
        if everything:
            if given:
                raise BadScope("all=true cannot be combined with ids")
            return cls(everything=True)
        if not given:
            raise BadScope("name a user (and optionally thread, message, voice), or all=true")
        names = ["user", "thread", "message", "voice"]
        for index, part in enumerate(parts[1:], start=1):
            if part is not None and parts[index - 1] is None:
                raise BadScope(f"{names[index]} needs {names[index - 1]}")
        for name, part in zip(names, parts, strict=True):
            if part is not None and not valid_id(part):
                raise BadScope(f"invalid {name}")
        return cls(user, thread_id, message_id, voice)

    def covers(self, key: CacheKey) -> bool:
        """True when `key` lies inside this scope."""
        if self.everything:
            return True
        pairs = (
            (self.user, key.user),
            (self.thread_id, key.thread_id),
            (self.message_id, key.message_id),
            (self.voice, key.voice),
        )
        return all(wanted is None or wanted == actual for wanted, actual in pairs)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """How many entries went from each place; `removed` is the most any one place held."""

    memory: int
    volume: int
    index: int
    fills_cancelled: int

    @property
    def removed(self) -> int:
        """Entries removed (each stored entry lives in memory, the Volume and the index)."""
        return max(self.memory, self.volume, self.index)

    def to_json(self) -> dict[str, int]:
        """The admin API's answer."""
        return {
            "removed": self.removed,
            "memory": self.memory,
            "volume": self.volume,
            "index": self.index,
            "fills_cancelled": self.fills_cancelled,
        }


async def purge(
    scope: PurgeScope,
    *,
    cache: TieredCache,
    flights: Flights | None,
    index: PostgresIndex | None,
    ownership: OwnershipCheck | None = None,
) -> PurgeResult:
    """Remove everything inside `scope`; a fill in flight for it is served but not stored."""
    cancelled = flights.cancel_store(scope.covers) if flights is not None else 0
    memory = await cache.purge_where(scope.covers)
    volume = await _purge_volume(scope, cache)
    removed_rows = await _purge_index(scope, index)
    if ownership is not None and scope.user is not None:
        ownership.forget(scope.user)
    result = PurgeResult(memory, volume, removed_rows, cancelled)
    log.info("purge removed %s", result.to_json())
    return result


async def _purge_volume(scope: PurgeScope, cache: TieredCache) -> int:
    volume: Any = cache.volume
    if volume is None:
        return 0
    if scope.voice is not None:
        assert scope.user and scope.thread_id and scope.message_id
        key = CacheKey(scope.user, scope.thread_id, scope.message_id, scope.voice)
        existed = await volume.exists(key)  # not get(): no need to read and hash the body
        await volume.delete(key)
        return int(existed)
    if scope.user is not None:
        count: int = await volume.delete_prefix(scope.user, scope.thread_id, scope.message_id)
        return count
    total = 0
    for user in await _volume_users(volume):
        total += await volume.delete_prefix(user)
    return total


async def _volume_users(volume: Any) -> list[str]:
    """Every user folder on the Volume, for a purge of everything."""
    if hasattr(volume, "list_entries"):
        return sorted({listed.key.user async for listed in volume.list_entries()})
    base = volume.base

    def users() -> list[str]:
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and valid_id(p.name))

    return await asyncio.to_thread(users)


async def _purge_index(scope: PurgeScope, index: PostgresIndex | None) -> int:
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
