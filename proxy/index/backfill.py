"""IndexBackfill: the elected janitor's walk of the Volume into the index, a batch per run.

A walk lists the Volume's entries; those the index has no row for get their sidecar read and a
row (never over a fresher one). A walk that reaches the end marks the Volume covered at the
generation it began with (`VolumeCoverage`), from when lookups trust the index's "absent". Entries
the walk skips are not servable as they are (a sidecar without its object, or disagreeing with
it: a Volume read would miss them too) or are being written, and their writer records them.

After a walk that covered the Volume, the next one starts `rewalk_seconds` later, to record what
a process that died between its Volume write and its row left behind; after one that could not
(a gap was reported while it walked), at the next run. A failure drops the walk: the next run
starts again, and what was recorded stays recorded, so it only lists again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from proxy.index.coverage import VolumeCoverage
from proxy.index.entries import PostgresIndex
from proxy.storage.entry import EntryInfo
from proxy.storage.tiers import DurableTier

log = logging.getLogger(__name__)

# Entries checked against the index in one query.
CHUNK: Final = 100
# How long after a walk that covered the Volume the next one starts.
REWALK_SECONDS: Final = 86_400.0


@dataclass
class WalkStep:
    """What one step of the walk did: entries listed, rows it added, and whether it ended."""

    walked: int = 0
    recorded: int = 0
    ended: bool = False
    covered: bool = False


class IndexBackfill:
    """Walks the Volume into the index, `limit` entries per `step`, resuming where it stopped."""

    def __init__(
        self,
        volume: DurableTier,
        index: PostgresIndex,
        coverage: VolumeCoverage,
        *,
        rewalk_seconds: float = REWALK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.volume = volume
        self.index = index
        self.coverage = coverage
        self.rewalk_seconds = rewalk_seconds
        self._clock = clock
        self._walk: AsyncIterator[EntryInfo] | None = None
        self._generation = 0
        self._next_walk_at = 0.0

    async def step(self, limit: int) -> WalkStep:
        """Walk up to `limit` more entries; raises what stopped it (the walk starts again)."""
        done = WalkStep()
        if self._walk is None:
            if self._clock() < self._next_walk_at:
                return done
            self._generation = await self.coverage.begin_walk()
            self._walk = aiter(self.volume.list_entries())
            log.debug("index walk of the Volume begins (generation %d)", self._generation)
        try:
            while done.walked < limit and not done.ended:
                chunk, done.ended = await _take(self._walk, min(CHUNK, limit - done.walked))
                done.walked += len(chunk)
                done.recorded += await self._record_unknown(chunk)
            if done.ended:
                done.covered = await self.coverage.complete_walk(self._generation)
                self._walk = None
                self._next_walk_at = self._clock() + (self.rewalk_seconds if done.covered else 0)
                log.info(
                    "index walk of the Volume ended: %s",
                    "the index covers the Volume"
                    if done.covered
                    else "an entry went unrecorded meanwhile; walking again",
                )
        except BaseException:
            self._walk = None
            raise
        return done

    def stop(self) -> None:
        """Forget the walk in progress (the next step begins a new one)."""
        self._walk = None

    async def _record_unknown(self, chunk: list[EntryInfo]) -> int:
        """Record the entries of `chunk` the index has no row for; return how many."""
        listed = [entry for entry in chunk if entry.bytes > 0]  # a sidecar alone is no entry
        known = await self.index.known([entry.key for entry in listed])
        recorded = 0
        for entry in listed:
            if entry.key in known:
                continue
            meta = await self.volume.read_meta(entry.key)
            if meta is None or meta.length != entry.bytes:
                continue  # not servable as it is, or being rewritten (its writer records it)
            path = self.volume.location(entry.key, meta.content_type)
            await self.index.record(entry.key, meta, path, newer_only=True)
            recorded += 1
        return recorded


async def _take(walk: AsyncIterator[EntryInfo], count: int) -> tuple[list[EntryInfo], bool]:
    """Up to `count` more entries of `walk`, and whether it has ended."""
    taken: list[EntryInfo] = []
    async for entry in walk:  # leaving the loop early keeps the walk where it is
        taken.append(entry)
        if len(taken) >= count:
            return taken, False
    return taken, True
