"""IndexLookup: the index asked whether a key is stored, so that a miss costs no Files API call.

The rule (docs/architecture.md, "Lookups through the index"): a lookup that found nothing in memory
and no fill in flight asks the index first, in one query by primary key. A row made from the same
text (and provider, when the request names one) is "stored": the Volume is read as before. No such
row is "absent", and the Volume is skipped, only while the index covers the Volume
(`VolumeCoverage`: a walk recorded what it held, and no process has reported an entry it could not
record since), or with `cache.volume.lookup_via_index = "always"`. Otherwise, and whenever the
index cannot answer within its share of the lookup budget, the Volume is read as before.

What protects the user: the index only ever lets a lookup skip the Volume; it never serves a byte.
Everything served is still read from memory or the Volume and checked there (text digest, length,
sha256). A row the Volume lacks costs one Files API call (a false "stored", the lookup misses as it
would have); an entry the index does not name costs one synthesis (a false "absent"), whose fill
rewrites the entry and its row. Neither can serve wrong audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Container
from typing import Any, Final, Literal

from proxy.config import VolumeSettings
from proxy.index.coverage import volume_id
from proxy.index.entries import PostgresIndex
from proxy.index.migrations import entries_table, volumes_table
from proxy.index.pool import IndexUnavailable
from proxy.policy import recording_matches
from proxy.speak import CacheKey
from proxy.storage.tiers import DurableTier

log = logging.getLogger(__name__)

STORED, ABSENT, UNCOVERED, UNAVAILABLE = "stored", "absent", "uncovered", "unavailable"
OUTCOMES: Final = (STORED, ABSENT, UNCOVERED, UNAVAILABLE)
# The share of cache.volume.lookup_budget_ms a request waits for the index: a healthy answer takes
# a millisecond or two, and the Volume read that follows a slow one still has its own budget.
INDEX_SHARE_OF_BUDGET: Final = 0.25
# While the index does not cover the Volume, lookups go to the Volume without asking it, and ask
# again this often (the answer says when a walk has completed).
RECHECK_SECONDS: Final = 10.0


class IndexLookup:
    """Answers "may `key` be on the Volume?" from the index; counts each answer by outcome."""

    def __init__(
        self,
        index: PostgresIndex,
        volume: str,
        *,
        trust: Literal["when-complete", "always"],
        wait_seconds: float,
        counts: Counter[str],
        unrecorded: Container[CacheKey] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        # Keys this process wrote to the Volume whose rows are still to be written.
        self.unrecorded = unrecorded
        self.volume = volume
        self.trust = trust
        self.wait_seconds = wait_seconds
        self.counts = counts
        self._clock = clock
        self._covered = False
        self._ask_again_at = 0.0
        # Queries a request stopped waiting for: they end (or time out, marking the index down)
        # on their own, held here meanwhile.
        self._left: set[asyncio.Task[Any]] = set()
        self._sql = f"""
            SELECT e.text_sha256, e.provider,
                   coalesce((SELECT v.covered = v.generation FROM {volumes_table(index.pool.schema)}
                             AS v WHERE v.volume = $5), false) AS covered
            FROM (VALUES (1)) AS one (x)
            LEFT JOIN {entries_table(index.pool.schema)} AS e
                ON e.user_id = $1 AND e.thread_id = $2 AND e.message_id = $3 AND e.voice = $4
        """

    @classmethod
    def build(
        cls,
        settings: VolumeSettings,
        volume: DurableTier | None,
        index: PostgresIndex | None,
        counts: Counter[str],
        unrecorded: Container[CacheKey] = (),
    ) -> IndexLookup | None:
        """The lookup for these settings, or None where lookups read the Volume directly.

        Only a Databricks Volume is worth it: a local Volume's miss is one failed open() of a
        sidecar, cheaper than a round trip to PostgreSQL, and its folder is this host's alone while
        the index is the fleet's, so a row does not say that this host's folder has the entry.
        """
        mode = settings.lookup_via_index
        if index is None or volume is None or volume.kind != "databricks" or mode == "off":
            return None
        if mode == "when-complete" and not volume.walkable:
            log.warning(
                "cache.volume.lookup_via_index: no walk can tell the index what the Volume holds"
                ' (auth = "user"), so its "not stored" is never trusted; set it to "always" if'
                " the index has recorded the Volume from its first entry"
            )
            return None
        return cls(
            index,
            volume_id(settings),
            trust=mode,
            wait_seconds=settings.lookup_budget_ms / 1000 * INDEX_SHARE_OF_BUDGET,
            counts=counts,
            unrecorded=unrecorded,
        )

    async def may_be_stored(self, key: CacheKey, text_sha256: str, provider: str | None) -> bool:
        """False only when the index says no recording of this text is stored (skip the Volume)."""
        outcome = await self._ask(key, text_sha256, provider)
        self.counts[outcome] += 1
        log.debug("index lookup %s: %s", key.digest(), outcome)
        return outcome != ABSENT

    async def _ask(self, key: CacheKey, text_sha256: str, provider: str | None) -> str:
        if key in self.unrecorded:
            return STORED  # written here, its row not yet: the index would say "absent"
        if not self.index.available:
            return UNAVAILABLE
        if self.trust == "when-complete" and not self._covered:
            if self._clock() < self._ask_again_at:
                return UNCOVERED
        args = (key.user, key.thread_id, key.message_id, key.voice, self.volume)
        query = self.index.pool.run("lookup", lambda con: con.fetchrow(self._sql, *args), key)
        task = asyncio.get_running_loop().create_task(query)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.wait_seconds)
        finally:
            if not task.done():
                self._leave(task)
        if not done:
            return UNAVAILABLE
        try:
            row = task.result()
        except IndexUnavailable:
            return UNAVAILABLE
        covered = self.trust == "always" or bool(row["covered"])
        if self.trust == "when-complete" and covered != self._covered:
            state = "covers the Volume" if covered else "does not cover the Volume"
            log.info("index lookups: the index %s", state)
        self._covered = covered
        if not covered:
            self._ask_again_at = self._clock() + RECHECK_SECONDS
        stored = row["text_sha256"]
        if stored is not None and recording_matches(stored, row["provider"], text_sha256, provider):
            return STORED
        return ABSENT if covered else UNCOVERED

    def _leave(self, task: asyncio.Task[Any]) -> None:
        self._left.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._left.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: counted by the pool already
