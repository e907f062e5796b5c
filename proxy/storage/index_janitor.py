"""IndexLedger: the janitor's questions to the PostgreSQL index, and its replica election."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo as StoredEntryInfo
from proxy.storage.index import PostgresIndex, quote_schema

LOCK_NAMESPACE: Final = "tts-cache-proxy:janitor"
_COLUMNS: Final = "user_id, thread_id, message_id, voice, bytes, created_at, last_hit_at"
# Ties broken by the key, so batches are stable from one run to the next.
_BY_HIT: Final = "last_hit_at, created_at, user_id, thread_id, message_id, voice"
_BY_KEY: Final = "user_id, thread_id, message_id, voice"
# A row is forgotten only while it still records the recording the janitor looked at: a
# re-recording in between (new created_at) keeps its row. Sub-millisecond float round trips.
_SAME_RECORDING: Final = "abs(extract(epoch FROM created_at)::float8 - $5) < 0.001"


class Election:
    """A won janitor election: the lock lasts as long as its connection stays open."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    @property
    def held(self) -> bool:
        """False once the lock connection has been lost (another replica may be elected)."""
        return not self._connection.is_closed()


class IndexLedger:
    """Totals and eviction candidates from the index, rows to re-check, and the janitor lock."""

    def __init__(self, index: PostgresIndex, *, lock_timeout_seconds: float = 5.0) -> None:
        self.index = index
        self.lock_timeout_seconds = lock_timeout_seconds
        self._table = f"{quote_schema(index.schema)}.tts_cache_entries"
        # Per schema, like the migration lock: proxies on other schemas never wait for this one.
        digest = hashlib.sha256(f"{LOCK_NAMESPACE}:{index.schema}".encode()).digest()
        self.lock_id = int.from_bytes(digest[:8], "big", signed=True)

    @contextlib.asynccontextmanager
    async def elected(self) -> AsyncIterator[Election | None]:
        """An Election while this replica holds the janitor lock, or None when another one does.

        A session-level `pg_try_advisory_lock` on a connection of its own: it never waits, and a
        replica that dies mid-run releases it with its connection.
        """
        import asyncpg  # loaded with the index (proxy.storage.index), not before

        async with self.index.acquire_lock_connection() as connection:
            won = await connection.fetchval(
                "SELECT pg_try_advisory_lock($1)", self.lock_id, timeout=self.lock_timeout_seconds
            )
            if not won:
                yield None
                return
            try:
                yield Election(connection)
            finally:
                # Closing the connection releases the lock as well; unlocking first is tidier.
                if not connection.is_closed():
                    with contextlib.suppress(
                        OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError
                    ):
                        await connection.execute(
                            "SELECT pg_advisory_unlock($1)",
                            self.lock_id,
                            timeout=self.lock_timeout_seconds,
                        )

    async def expired(self, before: float, limit: int) -> list[StoredEntryInfo]:
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
        total = await self.index.run("janitor_total", lambda con: con.fetchval(sql))
        return int(total)

    async def users_over(self, quota: int, limit: int) -> list[tuple[str, int]]:
        """Users holding more than `quota` bytes, the largest first."""
        sql = (
            f"SELECT user_id, sum(bytes)::bigint AS total FROM {self._table}"
            " GROUP BY user_id HAVING sum(bytes) > $1 ORDER BY total DESC, user_id LIMIT $2"
        )
        rows = await self.index.run("janitor_users", lambda con: con.fetch(sql, quota, limit))
        return [(str(row[0]), int(row[1])) for row in rows]

    async def oldest_of_user(self, user: str, limit: int) -> list[StoredEntryInfo]:
        """One user's rows, least recently hit first."""
        sql = f"SELECT {_COLUMNS} FROM {self._table} WHERE user_id = $1 ORDER BY {_BY_HIT} LIMIT $2"
        return await self._fetch("janitor_user_oldest", sql, user, limit)

    async def oldest(self, limit: int) -> list[StoredEntryInfo]:
        """Every replica's rows, least recently hit first."""
        sql = f"SELECT {_COLUMNS} FROM {self._table} ORDER BY {_BY_HIT} LIMIT $1"
        return await self._fetch("janitor_oldest", sql, limit)

    async def rows_after(self, after: CacheKey | None, limit: int) -> list[StoredEntryInfo]:
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

    async def forget(self, entry: StoredEntryInfo) -> bool:
        """Delete the row of `entry` unless it was re-recorded since; True when it went."""
        sql = (
            f"DELETE FROM {self._table} WHERE user_id = $1 AND thread_id = $2"
            f" AND message_id = $3 AND voice = $4 AND {_SAME_RECORDING}"
        )
        key = entry.key
        args = (key.user, key.thread_id, key.message_id, key.voice, entry.created_at)
        status = await self.index.run("janitor_forget", lambda con: con.execute(sql, *args))
        return str(status).rsplit(" ", 1)[-1] not in ("0", "")

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[StoredEntryInfo]:
        rows = await self.index.run(op, lambda con: con.fetch(sql, *args))
        return [_info(row) for row in rows]


def _info(row: Any) -> StoredEntryInfo:
    return StoredEntryInfo(
        CacheKey(row["user_id"], row["thread_id"], row["message_id"], row["voice"]),
        int(row["bytes"]),
        created_at=row["created_at"].timestamp(),
        last_hit_at=row["last_hit_at"].timestamp(),
    )
