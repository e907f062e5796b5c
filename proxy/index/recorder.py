"""EntryRecorder: an entry's index row after its Volume write, kept and retried until it lands.

A row is written only after its Volume write succeeded, so a row never names an object that was
never written. When the index cannot take the row (PostgreSQL down or slow), the entry is on the
Volume without it; the recorder keeps it (up to `max_unrecorded`) and writes it once the index
answers again, never over a fresher row. An entry it has to give up on (the bound, or
`max_attempts` failures while the index answered) withdraws the index's coverage of the Volume as
soon as the index answers (`VolumeCoverage.withdraw`), so no lookup trusts an "absent" that may be
wrong until a walk has recorded the Volume again.

What it cannot cover: a process that dies with rows still to write (between a Volume write and
its row, or during an outage). The next walk records those entries; until then a request for
one may be synthesized once more (docs/architecture.md, "Lookups through the index").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Final, NamedTuple

from proxy.index.coverage import VolumeCoverage
from proxy.index.entries import PostgresIndex
from proxy.index.legacy import LegacyMessages
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from proxy.storage.entry import Entry, EntryMeta
from proxy.storage.tiers import DurableTier

log = logging.getLogger(__name__)

MAX_UNRECORDED: Final = 10_000
MAX_ATTEMPTS: Final = 5
RETRY_SECONDS: Final = 1.0


class Unrecorded(NamedTuple):
    """An entry on the Volume whose row is still to be written."""

    meta: EntryMeta
    path: str
    attempts: int


class EntryRecorder:
    """The TieredCache's after-Volume-write step: the index row, then the legacy metadata."""

    def __init__(
        self,
        index: PostgresIndex,
        volume: DurableTier,
        *,
        coverage: VolumeCoverage | None = None,
        legacy: LegacyMessages | None = None,
        max_unrecorded: int = MAX_UNRECORDED,
        max_attempts: int = MAX_ATTEMPTS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.index = index
        self.volume = volume
        self.coverage = coverage
        self.legacy = legacy
        self.max_unrecorded = max_unrecorded
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds
        self.dropped = 0
        self.unrecorded: OrderedDict[CacheKey, Unrecorded] = OrderedDict()
        self._withdraw = False
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, key: CacheKey, entry: Entry) -> None:
        """Record an entry the Volume now holds; raises (counted by the cache) if it could not."""
        meta = entry.meta
        path = self.volume.location(key, meta.content_type)
        try:
            await self.index.record(key, meta, path)
        except IndexUnavailable:
            self._keep(key, Unrecorded(meta, path, 0))
            raise
        self.unrecorded.pop(key, None)  # an older recording still waiting is superseded
        # chat_messages has a row per message: a content key (a text's recording) has none.
        if self.legacy is not None and not key.is_content:
            await self.legacy.write_metadata(key, path, meta.provider, meta.created_at)

    def start(self) -> None:
        """Retry the rows still to write every `retry_seconds` while the index answers."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._retry_forever())

    async def aclose(self) -> None:
        """Stop retrying in the background; one last try; say what is left unrecorded."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        if (self.unrecorded or self._withdraw) and self.index.available:
            with contextlib.suppress(IndexUnavailable):
                await self.retry()
        if self.unrecorded:
            log.warning(
                "%d entries on the Volume have no index row (the index did not answer): the"
                " index's walk of the Volume will record them",
                len(self.unrecorded),
            )

    async def retry(self) -> int:
        """Write the kept rows in order (withdrawing coverage first if one was given up on);
        stops at the first failure. Returns how many rows were written."""
        if self._withdraw and self.coverage is not None:
            await self.coverage.withdraw()
            log.warning("index coverage of the Volume withdrawn: an entry went unrecorded")
        self._withdraw = False
        written = 0
        for key, kept in list(self.unrecorded.items()):
            try:
                await self.index.record(key, kept.meta, kept.path, newer_only=True)
            except IndexUnavailable:
                if kept.attempts + 1 >= self.max_attempts:
                    self._give_up(key)
                elif key in self.unrecorded:
                    self.unrecorded[key] = kept._replace(attempts=kept.attempts + 1)
                raise
            if self.unrecorded.get(key) is kept:
                del self.unrecorded[key]
            written += 1
            if self.legacy is not None and not key.is_content:
                with contextlib.suppress(IndexUnavailable):
                    await self.legacy.write_metadata(
                        key, kept.path, kept.meta.provider, kept.meta.created_at
                    )
        return written

    def _keep(self, key: CacheKey, kept: Unrecorded) -> None:
        self.unrecorded.pop(key, None)
        self.unrecorded[key] = kept
        if len(self.unrecorded) > self.max_unrecorded:
            oldest, _ = self.unrecorded.popitem(last=False)
            self._give_up(oldest)

    def _give_up(self, key: CacheKey) -> None:
        self.unrecorded.pop(key, None)
        self.dropped += 1
        if not self._withdraw:
            log.warning(
                "index row of %s given up: the index's coverage of the Volume is withdrawn when"
                " it answers",
                key.digest(),
            )
        self._withdraw = True

    async def _retry_forever(self) -> None:
        while True:
            await asyncio.sleep(self.retry_seconds)
            if (self.unrecorded or self._withdraw) and self.index.available:
                with contextlib.suppress(IndexUnavailable):
                    await self.retry()
