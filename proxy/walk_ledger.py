"""The janitor's ledger: where it reads sizes and hit times (Ledger), and one walk of the Volume."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo


class Ledger(Protocol):
    """Where the janitor reads sizes and hit times from: the index, or one walk of the Volume."""

    async def expired(self, before: float, limit: int) -> list[EntryInfo]:
        """Entries last hit (or made, when never hit) before `before`, oldest first."""
        ...

    async def total_bytes(self) -> int:
        """The bytes of every entry."""
        ...

    async def users_over(self, quota: int, limit: int) -> list[tuple[str, int]]:
        """(user, bytes) of users over `quota`, the largest first."""
        ...

    async def oldest_of_user(self, user: str, limit: int) -> list[EntryInfo]:
        """One user's entries, least recently hit first."""
        ...

    async def oldest(self, limit: int) -> list[EntryInfo]:
        """Every entry, least recently hit first."""
        ...

    async def forget(self, entry: EntryInfo) -> bool:
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
        self, entries: Iterable[EntryInfo], hits: Mapping[CacheKey, float] | None = None
    ) -> None:
        hits = hits or {}
        self._entries: dict[CacheKey, EntryInfo] = {}
        for entry in entries:
            hit = hits.get(entry.key)
            if hit is not None and hit > entry.last_hit_at:
                entry = dataclasses.replace(entry, last_hit_at=hit)
            self._entries[entry.key] = entry

    async def expired(self, before: float, limit: int) -> list[EntryInfo]:
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

    async def oldest_of_user(self, user: str, limit: int) -> list[EntryInfo]:
        """One user's entries, least recently hit first."""
        return [entry for entry in self._by_hit() if entry.key.user == user][:limit]

    async def oldest(self, limit: int) -> list[EntryInfo]:
        """Every entry, least recently hit first."""
        return self._by_hit()[:limit]

    async def forget(self, entry: EntryInfo) -> bool:
        """Drop an evicted entry."""
        return self._entries.pop(entry.key, None) is not None

    def _by_hit(self) -> list[EntryInfo]:
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


def _hit_order(entry: EntryInfo) -> tuple[float, float, str, str, str, str]:
    key = entry.key
    return (
        entry.last_hit_at,
        entry.created_at,
        key.user,
        key.thread_id,
        key.message_id,
        key.voice,
    )
