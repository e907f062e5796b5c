"""IndexLedger: the janitor's questions to the PostgreSQL index, and its replica election."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

from proxy.index.lease import DEFAULT_LEASE_SECONDS, Lease, Leases
from proxy.index.migrations import entries_table
from proxy.index.pool import IndexPool
from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo

JANITOR_LEASE: Final = "janitor"
_COLUMNS: Final = "user_id, thread_id, message_id, voice, bytes, created_at, last_hit_at"
# Ties broken by the key, so batches are stable from one run to the next.
_BY_HIT: Final = "last_hit_at, created_at, user_id, thread_id, message_id, voice"
_BY_KEY: Final = "user_id, thread_id, message_id, voice"
# A row is forgotten only while it still records the recording the janitor looked at: a
# re-recording in between (new created_at) keeps its row. Sub-millisecond float round trips.
_SAME_RECORDING: Final = "abs(extract(epoch FROM created_at)::float8 - $5) < 0.001"


class IndexLedger:
    """Totals and eviction candidates from the index, rows to re-check, and the janitor lease."""

    def __init__(
        self, pool: IndexPool, *, lease_seconds: float = DEFAULT_LEASE_SECONDS, holder: str = ""
    ) -> None:
        self.pool = pool
        self.lease_seconds = lease_seconds
        self._table = entries_table(pool.schema)
        # In the index's schema: proxies on other schemas elect their own janitor.
        self._leases = Leases(pool, holder=holder or None)

    @contextlib.asynccontextmanager
    async def elected(self) -> AsyncIterator[Lease | None]:
        """The janitor's Lease while this replica holds it, or None when another one does.

        Taken without waiting; given back on exit. IndexUnavailable when the index cannot say.
        """
        lease = await self._leases.acquire(JANITOR_LEASE, self.lease_seconds)
        if lease is None:
            yield None
            return
        try:
            yield lease
        finally:
            await lease.release()

    async def expired(self, before: float, limit: int) -> list[EntryInfo]:
        """Rows whose last hit (their creation, when never hit) is older than `before`."""
        sql = (
            f"SELECT {_COLUMNS} FROM {self._table} WHERE last_hit_at < $1"
            f" ORDER BY {_BY_HIT} LIMIT $2"
        )
        at = datetime.fromtimestamp(before, UTC)
        return await self._fetch("janitor_expired", sql, at, limit)

    async def total_bytes(self) -> int:
        """The bytes every row records."""
        sql = f"SELECT coalesce(sum(bytes), 0)::bigint FROM {self._table}"
        total = await self.pool.run("janitor_total", lambda con: con.fetchval(sql))
        return int(total)

    async def users_over(self, quota: int, limit: int) -> list[tuple[str, int]]:
        """Users holding more than `quota` bytes, the largest first."""
        sql = (
            f"SELECT user_id, sum(bytes)::bigint AS total FROM {self._table}"
            " GROUP BY user_id HAVING sum(bytes) > $1 ORDER BY total DESC, user_id LIMIT $2"
        )
        rows = await self.pool.run("janitor_users", lambda con: con.fetch(sql, quota, limit))
        return [(str(row[0]), int(row[1])) for row in rows]

    async def oldest_of_user(self, user: str, limit: int) -> list[EntryInfo]:
        """One user's rows, least recently hit first."""
        sql = f"SELECT {_COLUMNS} FROM {self._table} WHERE user_id = $1 ORDER BY {_BY_HIT} LIMIT $2"
        return await self._fetch("janitor_user_oldest", sql, user, limit)

    async def oldest(self, limit: int) -> list[EntryInfo]:
        """Every replica's rows, least recently hit first."""
        sql = f"SELECT {_COLUMNS} FROM {self._table} ORDER BY {_BY_HIT} LIMIT $1"
        return await self._fetch("janitor_oldest", sql, limit)

    async def rows_after(self, after: CacheKey | None, limit: int) -> list[EntryInfo]:
        """Rows in key order after `after` (from the first when None): one batch to re-check."""
        if after is None:
            sql = f"SELECT {_COLUMNS} FROM {self._table} ORDER BY {_BY_KEY} LIMIT $1"
            return await self._fetch("janitor_rows", sql, limit)
        sql = (
            f"SELECT {_COLUMNS} FROM {self._table}"
            f" WHERE ({_BY_KEY}) > ($1, $2, $3, $4) ORDER BY {_BY_KEY} LIMIT $5"
        )
        parts = (after.user, after.thread_id, after.message_id, after.voice)
        return await self._fetch("janitor_rows", sql, *parts, limit)

    async def forget(self, entry: EntryInfo) -> bool:
        """Delete the row of `entry` unless it was re-recorded since; True when it went."""
        sql = (
            f"DELETE FROM {self._table} WHERE user_id = $1 AND thread_id = $2"
            f" AND message_id = $3 AND voice = $4 AND {_SAME_RECORDING}"
        )
        key = entry.key
        args = (key.user, key.thread_id, key.message_id, key.voice, entry.created_at)
        status = await self.pool.run("janitor_forget", lambda con: con.execute(sql, *args))
        return str(status).rsplit(" ", 1)[-1] not in ("0", "")

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[EntryInfo]:
        rows = await self.pool.run(op, lambda con: con.fetch(sql, *args))
        return [_info(row) for row in rows]


def _info(row: Any) -> EntryInfo:
    return EntryInfo(
        CacheKey(row["user_id"], row["thread_id"], row["message_id"], row["voice"]),
        int(row["bytes"]),
        created_at=row["created_at"].timestamp(),
        last_hit_at=row["last_hit_at"].timestamp(),
    )
