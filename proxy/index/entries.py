"""PostgresIndex: the tts_cache_entries table, the shared record of every replica's stored entries.

Hits are only buffered on the request path and written by a background flush; every other call is
bounded by the pool and raises `IndexUnavailable` when PostgreSQL cannot answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from proxy.config import IndexSettings
from proxy.index.migrations import entries_table
from proxy.index.pool import IndexPool, IndexUnavailable, Password, row_count
from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo, EntryMeta

MAX_LIST_LIMIT: Final = 1000
TOP_USERS: Final = 20

_COLUMNS: Final = (
    "user_id, thread_id, message_id, voice, provider, path, content_type, bytes, body_sha256,"
    " text_sha256, created_at, last_hit_at, hits"
)


@dataclass(frozen=True, slots=True)
class UserUsage:
    """What one user's entries cost."""

    user: str
    entries: int
    bytes: int


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Totals across every replica, and the users holding the most bytes."""

    entries: int
    bytes: int
    hits: int
    top_users: tuple[UserUsage, ...]


class PostgresIndex:
    """The tts_cache_entries table on an IndexPool (which it starts and closes), hits buffered."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "tts_cache",
        timeout_seconds: float = 2.0,
        pool_max_size: int = 10,
        password: Password | None = None,
        flush_interval_seconds: float = 1.0,
        max_pending_touches: int = 10_000,
        **pool_options: Any,
    ) -> None:
        self.pool = IndexPool(
            dsn,
            schema=schema,
            timeout_seconds=timeout_seconds,
            pool_max_size=pool_max_size,
            password=password,
            **pool_options,
        )
        self._table = entries_table(schema)
        self._flush_interval = flush_interval_seconds
        self._max_pending = max_pending_touches
        self.touches_dropped = 0
        self._pending: dict[CacheKey, tuple[int, float]] = {}
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, settings: IndexSettings, *, password: Password | None = None, **options: Any
    ) -> PostgresIndex:
        """An index for `settings`; an empty DSN means the standard PG* environment variables."""
        options.setdefault("prepared_statements", settings.prepared_statements)
        return cls(
            settings.dsn or None,
            schema=settings.schema,
            timeout_seconds=settings.timeout_seconds,
            pool_max_size=settings.pool_max_size,
            password=password,
            **options,
        )

    @property
    def available(self) -> bool:
        """True while PostgreSQL answers and the schema is migrated."""
        return self.pool.available

    @property
    def errors(self) -> Counter[str]:
        """Failed calls by operation, this table's and every other user of the pool's."""
        return self.pool.errors

    @property
    def pending_touches(self) -> int:
        """Keys whose hits wait for the next flush."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the pool (see IndexPool.start) and the background flush of hits."""
        if self._flusher is not None or self.pool.closed:
            return
        await self.pool.start()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def aclose(self) -> None:
        """Stop the background flush, write the buffered hits if possible, close the pool."""
        if self.pool.closed:
            return
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
        if self._pending and self.available:
            with contextlib.suppress(IndexUnavailable):
                await self.flush()
        await self.pool.aclose()

    async def ping(self) -> bool:
        """True when the index is available and PostgreSQL answers now; never raises."""
        return await self.pool.ping()

    async def record(
        self, key: CacheKey, meta: EntryMeta, path: str, *, newer_only: bool = False
    ) -> None:
        """Insert or replace the row of a stored entry; a replaced recording starts at 0 hits.

        `newer_only`: keep a row made at or after `meta.created_at` (a late record, or a walk's,
        never replaces what a fresher write recorded).
        """
        self._pending.pop(key, None)
        newer = "WHERE e.created_at < EXCLUDED.created_at" if newer_only else ""
        sql = f"""
            INSERT INTO {self._table} AS e ({_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, 0)
            ON CONFLICT (user_id, thread_id, message_id, voice) DO UPDATE SET
                provider = EXCLUDED.provider, path = EXCLUDED.path,
                content_type = EXCLUDED.content_type, bytes = EXCLUDED.bytes,
                body_sha256 = EXCLUDED.body_sha256, text_sha256 = EXCLUDED.text_sha256,
                created_at = EXCLUDED.created_at, last_hit_at = EXCLUDED.last_hit_at, hits = 0
            {newer}
        """
        args = (
            *_key_args(key),
            meta.provider,
            path,
            meta.content_type,
            meta.length,
            meta.body_sha256,
            meta.text_sha256,
            datetime.fromtimestamp(meta.created_at, UTC),
        )
        await self.pool.run("record", lambda con: con.execute(sql, *args), key)

    async def known(self, keys: list[CacheKey]) -> set[CacheKey]:
        """Which of `keys` have a row (one query, by primary key)."""
        if not keys:
            return set()
        columns = tuple(list(part) for part in zip(*(_key_args(key) for key in keys), strict=True))
        sql = f"""
            SELECT e.user_id, e.thread_id, e.message_id, e.voice
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                AS t(user_id, thread_id, message_id, voice)
            JOIN {self._table} AS e USING (user_id, thread_id, message_id, voice)
        """
        found = await self.pool.run("known", lambda con: con.fetch(sql, *columns))
        return {CacheKey(row[0], row[1], row[2], row[3]) for row in found}

    async def touch(self, key: CacheKey) -> None:
        """Count a hit; only buffered here, the background flush writes it (no I/O, no wait)."""
        self._merge_touch(key, 1, time.time())

    async def flush(self) -> int:
        """Write the buffered hits now; returns how many rows were updated."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for key, (count, at) in batch.items():
            for column, value in zip(
                columns, (*_key_args(key), count, datetime.fromtimestamp(at, UTC)), strict=True
            ):
                column.append(value)
        sql = f"""
            UPDATE {self._table} AS e
            SET hits = e.hits + t.n, last_hit_at = GREATEST(e.last_hit_at, t.at)
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                        $6::timestamptz[]) AS t(user_id, thread_id, message_id, voice, n, at)
            WHERE e.user_id = t.user_id AND e.thread_id = t.thread_id
              AND e.message_id = t.message_id AND e.voice = t.voice
        """
        try:
            status = await self.pool.run("touch", lambda con: con.execute(sql, *columns))
        except (IndexUnavailable, asyncio.CancelledError):
            # A write cancelled after the server applied it is counted twice: hit counts are
            # advisory, and losing them on every outage would be worse.
            self._requeue(batch)
            raise
        return row_count(status)

    async def remove(self, key: CacheKey) -> bool:
        """Delete the row of `key`; True when there was one."""
        self._pending.pop(key, None)
        sql = (
            f"DELETE FROM {self._table}"
            " WHERE user_id = $1 AND thread_id = $2 AND message_id = $3 AND voice = $4"
        )
        status = await self.pool.run("remove", lambda con: con.execute(sql, *_key_args(key)), key)
        return row_count(status) > 0

    async def remove_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Delete every row of `user` (within a thread, a message); returns how many."""
        where, args = _where(user_id=user, thread_id=thread_id, message_id=message_id)
        sql = f"DELETE FROM {self._table} {where}"
        status = await self.pool.run("remove_prefix", lambda con: con.execute(sql, *args))
        return row_count(status)

    async def remove_all(self) -> int:
        """Delete every row; returns how many."""
        self._pending.clear()
        sql = f"DELETE FROM {self._table}"
        status = await self.pool.run("remove_all", lambda con: con.execute(sql))
        return row_count(status)

    async def list_entries(
        self,
        user: str | None = None,
        thread_id: str | None = None,
        message_id: str | None = None,
        voice: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[EntryInfo]:
        """Rows matching the given key parts, newest first."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        if offset < 0:
            raise ValueError("offset must be 0 or more")
        where, args = _where(user_id=user, thread_id=thread_id, message_id=message_id, voice=voice)
        n = len(args)
        sql = (
            f"SELECT {_COLUMNS} FROM {self._table} {where}"
            " ORDER BY created_at DESC, user_id, thread_id, message_id, voice"
            f" LIMIT ${n + 1} OFFSET ${n + 2}"
        )
        rows = await self.pool.run("list", lambda con: con.fetch(sql, *args, limit, offset))
        return [_entry(row) for row in rows]

    async def least_recently_hit(
        self, limit: int = 100, before: datetime | None = None
    ) -> list[EntryInfo]:
        """Eviction candidates across every replica: the rows hit longest ago first."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        sql = (
            f"SELECT {_COLUMNS} FROM {self._table}"
            " WHERE $1::timestamptz IS NULL OR last_hit_at < $1"
            " ORDER BY last_hit_at LIMIT $2"
        )
        rows = await self.pool.run("least_recently_hit", lambda con: con.fetch(sql, before, limit))
        return [_entry(row) for row in rows]

    async def stats(self) -> IndexStats:
        """Entries, bytes and hits in total, and the top users by bytes."""
        totals_sql = (
            "SELECT count(*), coalesce(sum(bytes), 0)::bigint, coalesce(sum(hits), 0)::bigint"
            f" FROM {self._table}"
        )
        users_sql = (
            f"SELECT user_id, count(*), sum(bytes)::bigint AS total FROM {self._table}"
            " GROUP BY user_id ORDER BY total DESC, user_id LIMIT $1"
        )

        async def query(con: Any) -> IndexStats:
            totals = await con.fetchrow(totals_sql)
            users = await con.fetch(users_sql, TOP_USERS)
            return IndexStats(
                entries=int(totals[0]),
                bytes=int(totals[1]),
                hits=int(totals[2]),
                top_users=tuple(UserUsage(str(u[0]), int(u[1]), int(u[2])) for u in users),
            )

        return await self.pool.run("stats", query)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            if self._pending and self.available:
                with contextlib.suppress(IndexUnavailable):
                    await self.flush()

    def _merge_touch(self, key: CacheKey, count: int, at: float) -> None:
        known = self._pending.get(key)
        if known is not None:
            self._pending[key] = (known[0] + count, max(known[1], at))
        elif len(self._pending) < self._max_pending:
            self._pending[key] = (count, at)
        else:
            # Bounded so a long outage cannot grow the buffer without limit.
            self.touches_dropped += count

    def _requeue(self, batch: dict[CacheKey, tuple[int, float]]) -> None:
        for key, (count, at) in batch.items():
            self._merge_touch(key, count, at)


def _key_args(key: CacheKey) -> tuple[str, str, str, str]:
    return key.user, key.thread_id, key.message_id, key.voice


def _where(**filters: str | None) -> tuple[str, list[str]]:
    # Column names come from the keyword names above, never from input; values are parameters.
    clauses: list[str] = []
    args: list[str] = []
    for column, value in filters.items():
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _entry(row: Any) -> EntryInfo:
    return EntryInfo(
        key=CacheKey(row["user_id"], row["thread_id"], row["message_id"], row["voice"]),
        bytes=int(row["bytes"]),
        created_at=row["created_at"].timestamp(),
        last_hit_at=row["last_hit_at"].timestamp(),
        provider=row["provider"],
        hits=int(row["hits"]),
        path=row["path"],
        content_type=row["content_type"],
        body_sha256=row["body_sha256"],
        text_sha256=row["text_sha256"],
    )
