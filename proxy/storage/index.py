"""PostgresIndex: the shared record of stored entries, ownership checks and the legacy metadata.

The index is an optional helper: every method is bounded by `timeout_seconds` and raises
`IndexUnavailable` instead of waiting on a slow or absent PostgreSQL, so the caller decides whether
to skip and count (recording, hits) or to fail closed (ownership).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from proxy.config import ConfigError, IndexSettings
from proxy.speak import CacheKey
from proxy.storage.entry import EntryMeta

log = logging.getLogger(__name__)

T = TypeVar("T")

# A string, or a function (sync or async) asyncpg calls for every new connection, so a rotating
# Lakebase OAuth token is read fresh each time a connection is opened.
Password = str | Callable[[], str | Awaitable[str]]
Query = Callable[[Any], Awaitable[T]]

LEGACY_TABLE: Final = "chat_messages"
MAX_LIST_LIMIT: Final = 1000
TOP_USERS: Final = 20

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# SQLSTATE classes that mean "the server is not there for us": connection exception, invalid
# authorization (an expired token), insufficient resources, operator intervention (shutdown,
# starting up) and a database that does not exist (yet).
_OUTAGE_CLASSES: Final = frozenset({"08", "28", "53", "57", "3D"})
_QUERY_CANCELED: Final = "57014"

# Each migration runs once, in order, inside the transaction that holds the advisory lock;
# add new ones at the end and never edit an applied one.
_MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS {schema}.tts_cache_entries (
            user_id      text        NOT NULL,
            thread_id    text        NOT NULL,
            message_id   text        NOT NULL,
            voice        text        NOT NULL,
            provider     text,
            path         text        NOT NULL,
            content_type text        NOT NULL,
            bytes        bigint      NOT NULL,
            body_sha256  text        NOT NULL,
            text_sha256  text        NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            last_hit_at  timestamptz NOT NULL DEFAULT now(),
            hits         bigint      NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, thread_id, message_id, voice)
        );
        CREATE INDEX IF NOT EXISTS tts_cache_entries_last_hit_at
            ON {schema}.tts_cache_entries (last_hit_at);
        CREATE INDEX IF NOT EXISTS tts_cache_entries_user_created_at
            ON {schema}.tts_cache_entries (user_id, created_at DESC);
        """,
    ),
)
SCHEMA_VERSION: Final = _MIGRATIONS[-1][0]

_COLUMNS: Final = (
    "user_id, thread_id, message_id, voice, provider, path, content_type, bytes, body_sha256,"
    " text_sha256, created_at, last_hit_at, hits"
)


class IndexUnavailable(Exception):
    """The index could not answer in time: PostgreSQL is down, slow, or refused the query."""


@dataclass(frozen=True, slots=True)
class IndexedEntry:
    """One row of the index: where an entry lives and how it has been used."""

    user: str
    thread_id: str
    message_id: str
    voice: str
    provider: str | None
    path: str
    content_type: str
    bytes: int
    body_sha256: str
    text_sha256: str
    created_at: datetime
    last_hit_at: datetime
    hits: int

    @property
    def key(self) -> CacheKey:
        """The cache key this row describes."""
        return CacheKey(self.user, self.thread_id, self.message_id, self.voice)


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


def index_enabled(settings: IndexSettings, environ: Mapping[str, str]) -> bool:
    """True when a DSN is configured or the standard PGHOST variable names a server."""
    return bool(settings.dsn or environ.get("PGHOST"))


def quote_schema(name: str) -> str:
    """`name` as a quoted SQL identifier; ConfigError unless it is a plain identifier."""
    if _IDENTIFIER.fullmatch(name) is None:
        raise ConfigError(
            "index.schema", f"must be letters, digits and _ (at most 63), got {name!r}"
        )
    return '"' + name + '"'


class PostgresIndex:
    """The tts_cache_entries table on an asyncpg pool, with ownership and legacy metadata."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "tts_cache",
        timeout_seconds: float = 2.0,
        pool_max_size: int = 10,
        ownership_query: str = IndexSettings.ownership_query,
        password: Password | None = None,
        flush_interval_seconds: float = 1.0,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 15.0,
        max_pending_touches: int = 10_000,
    ) -> None:
        if timeout_seconds <= 0:
            raise ConfigError("index.timeout_seconds", "must be greater than 0")
        if pool_max_size < 1:
            raise ConfigError("index.pool_max_size", "must be 1 or more")
        self.schema = schema
        self._schema = quote_schema(schema)
        self._table = f"{self._schema}.tts_cache_entries"
        self._dsn = dsn or None
        self._password = password
        self._timeout = timeout_seconds
        self._pool_max_size = pool_max_size
        self._ownership_query = ownership_query
        self._flush_interval = flush_interval_seconds
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._max_pending = max_pending_touches
        # Waiting for another replica's migration lock is normal at a rolling start.
        self._migrate_timeout = 5 * timeout_seconds
        # Per schema, so two proxies sharing a database with different schemas do not serialize.
        digest = hashlib.sha256(f"tts-cache-proxy:{schema}".encode()).digest()
        self._lock_id = int.from_bytes(digest[:8], "big", signed=True)

        self.errors: Counter[str] = Counter()
        self.touches_dropped = 0
        self._pool: Any = None
        self._available = False
        self._migrated = False
        self._closed = False
        self._pending: dict[CacheKey, tuple[int, float]] = {}
        self._recovery: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Strong references to timed-out work still cleaning up its connection.
        self._abandoned: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_settings(
        cls, settings: IndexSettings, *, password: Password | None = None, **options: Any
    ) -> PostgresIndex:
        """An index for `settings`; an empty DSN means the standard PG* environment variables."""
        return cls(
            settings.dsn or None,
            schema=settings.schema,
            timeout_seconds=settings.timeout_seconds,
            pool_max_size=settings.pool_max_size,
            ownership_query=settings.ownership_query,
            password=password,
            **options,
        )

    @property
    def available(self) -> bool:
        """True while PostgreSQL answers and the schema is migrated."""
        return self._available and not self._closed

    @property
    def pending_touches(self) -> int:
        """Keys whose hits wait for the next flush."""
        return len(self._pending)

    async def start(self) -> None:
        """Create the pool and migrate; when PostgreSQL is unreachable, retry in the background."""
        if self._pool is not None or self._closed:
            return
        import asyncpg  # here, not at the top: ~3 MiB a proxy without an index need not hold

        # min_size=0: creating the pool opens no connection, so it cannot fail on an outage;
        # connections are opened on demand and replaced by the pool when the server drops them.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            password=self._password,
            min_size=0,
            max_size=self._pool_max_size,
            timeout=self._timeout,
            server_settings={"application_name": "tts-cache-proxy"},
        )
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        try:
            await self._bounded(self._connect_and_migrate(), self._migrate_timeout)
        except Exception as exc:
            self.errors["start"] += 1
            log.warning(
                "index unavailable at start (%s); retrying in the background", _describe(exc)
            )
            self._ensure_recovery()
        else:
            self._available = True
            log.info("index ready (schema %s, version %d)", self.schema, SCHEMA_VERSION)

    async def aclose(self) -> None:
        """Stop the background tasks, write the buffered hits if possible, close the pool."""
        if self._closed:
            return
        import asyncpg

        for task in (self._recovery, self._flusher):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._recovery, self._flusher) if t is not None), return_exceptions=True
        )
        if self._pending and self.available:
            try:
                await self.flush()
            except IndexUnavailable:
                pass
        self._closed = True
        self._available = False
        if self._abandoned:
            await asyncio.wait(self._abandoned, timeout=self._timeout)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    async def ping(self) -> bool:
        """True when the index is available and PostgreSQL answers now; never raises."""
        try:
            await self._call("ping", lambda con: con.fetchval("SELECT 1"))
        except IndexUnavailable:
            return False
        return True

    async def record(self, key: CacheKey, meta: EntryMeta, path: str) -> None:
        """Insert or replace the row of a stored entry; a replaced recording starts at 0 hits."""
        self._pending.pop(key, None)
        sql = f"""
            INSERT INTO {self._table} AS e ({_COLUMNS})
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, 0)
            ON CONFLICT (user_id, thread_id, message_id, voice) DO UPDATE SET
                provider = EXCLUDED.provider, path = EXCLUDED.path,
                content_type = EXCLUDED.content_type, bytes = EXCLUDED.bytes,
                body_sha256 = EXCLUDED.body_sha256, text_sha256 = EXCLUDED.text_sha256,
                created_at = EXCLUDED.created_at, last_hit_at = EXCLUDED.last_hit_at, hits = 0
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
        await self._call("record", lambda con: con.execute(sql, *args), key)

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
            status = await self._call("touch", lambda con: con.execute(sql, *columns))
        except (IndexUnavailable, asyncio.CancelledError):
            # A write cancelled after the server applied it is counted twice: hit counts are
            # advisory, and losing them on every outage would be worse.
            self._requeue(batch)
            raise
        return _row_count(status)

    async def remove(self, key: CacheKey) -> bool:
        """Delete the row of `key`; True when there was one."""
        self._pending.pop(key, None)
        sql = (
            f"DELETE FROM {self._table}"
            " WHERE user_id = $1 AND thread_id = $2 AND message_id = $3 AND voice = $4"
        )
        status = await self._call("remove", lambda con: con.execute(sql, *_key_args(key)), key)
        return _row_count(status) > 0

    async def remove_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Delete every row of `user` (within a thread, a message); returns how many."""
        where, args = _where(user_id=user, thread_id=thread_id, message_id=message_id)
        sql = f"DELETE FROM {self._table} {where}"
        status = await self._call("remove_prefix", lambda con: con.execute(sql, *args))
        return _row_count(status)

    async def remove_all(self) -> int:
        """Delete every row; returns how many."""
        self._pending.clear()
        sql = f"DELETE FROM {self._table}"
        status = await self._call("remove_all", lambda con: con.execute(sql))
        return _row_count(status)

    async def list_entries(
        self,
        user: str | None = None,
        thread_id: str | None = None,
        message_id: str | None = None,
        voice: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[IndexedEntry]:
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
        rows = await self._call("list", lambda con: con.fetch(sql, *args, limit, offset))
        return [_entry(row) for row in rows]

    async def least_recently_hit(
        self, limit: int = 100, before: datetime | None = None
    ) -> list[IndexedEntry]:
        """Eviction candidates across every replica: the rows hit longest ago first."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        sql = (
            f"SELECT {_COLUMNS} FROM {self._table}"
            " WHERE $1::timestamptz IS NULL OR last_hit_at < $1"
            " ORDER BY last_hit_at LIMIT $2"
        )
        rows = await self._call("least_recently_hit", lambda con: con.fetch(sql, before, limit))
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

        return await self._call("stats", query)

    async def owns(self, user: str, message_id: str) -> bool:
        """True when the legacy table says `user` owns `message_id`; IndexUnavailable if unsure."""
        row = await self._call(
            "owns", lambda con: con.fetchrow(self._ownership_query, message_id, user)
        )
        # Accept both `SELECT 1 ...` (a row or none) and `SELECT EXISTS(...)` (true or false).
        return row is not None and row[0] is not None and row[0] is not False

    async def write_legacy_metadata(
        self, key: CacheKey, volume_path: str, provider: str | None, cached_at: datetime | float
    ) -> bool:
        """Set chat_messages.metadata.tts_cache as the legacy backend did, on the owner's row."""
        if not isinstance(cached_at, datetime):
            cached_at = datetime.fromtimestamp(cached_at, UTC)
        # The legacy UPDATE matched the message id alone; matching the user too means a user
        # can never rewrite the metadata of someone else's message.
        sql = f"""
            UPDATE {LEGACY_TABLE}
            SET metadata = COALESCE(metadata, '{{}}'::jsonb) || jsonb_build_object(
                'tts_cache', jsonb_build_object(
                    'volume_path', $3::text, 'voice', $4::text,
                    'provider', $5::text, 'cached_at', $6::text))
            WHERE message_id = $1 AND user_id = $2
        """
        args = (key.message_id, key.user, volume_path, key.voice, provider, cached_at.isoformat())
        status = await self._call("legacy_metadata", lambda con: con.execute(sql, *args), key)
        return _row_count(status) > 0

    async def run(self, op: str, query: Query[T]) -> T:
        """Run `query(connection)` on the pool, bounded and counted like every call here."""
        return await self._call(op, query)

    @contextlib.asynccontextmanager
    async def acquire_lock_connection(self) -> AsyncIterator[Any]:
        """A connection of its own, outside the pool, for a session-level advisory lock.

        Outside the pool so that a lock held for a whole janitor run neither takes a pool slot
        from the request path nor goes back to the pool still held. Closed on exit, which also
        releases whatever it still holds; IndexUnavailable when it cannot be opened.
        """
        import asyncpg

        if self._closed or not self.available:
            self.errors["lock"] += 1
            raise IndexUnavailable("index lock: unavailable")
        try:
            con = await self._bounded(
                asyncpg.connect(
                    self._dsn,
                    password=self._password,
                    timeout=self._timeout,
                    server_settings={"application_name": "tts-cache-proxy janitor"},
                ),
                self._timeout,
            )
        except Exception as exc:
            self.errors["lock"] += 1
            log.warning("index lock connection failed: %s", _describe(exc))
            raise IndexUnavailable(f"index lock: {type(exc).__name__}") from exc
        try:
            yield con
        finally:
            try:
                await asyncio.wait_for(con.close(), self._timeout)
            except asyncio.CancelledError:
                con.terminate()
                raise
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                con.terminate()

    async def _call(self, op: str, query: Query[T], key: CacheKey | None = None) -> T:
        pool = self._pool
        if pool is None or not self.available:
            # Fail fast while down: the background recovery finds out when it is back.
            self.errors[op] += 1
            raise IndexUnavailable(f"index {op}: unavailable")
        try:
            return await self._bounded(self._on_connection(pool, query), self._timeout)
        except Exception as exc:
            self.errors[op] += 1
            where = f" for key {key.digest()}" if key is not None else ""
            if _is_outage(exc):
                self._mark_down(op, exc)
            else:
                log.warning("index %s failed%s: %s", op, where, _describe(exc))
            raise IndexUnavailable(f"index {op}: {type(exc).__name__}") from exc

    async def _on_connection(self, pool: Any, query: Query[T]) -> T:
        # The acquire timeout also bounds the release, so abandoned work cannot linger forever.
        async with pool.acquire(timeout=self._timeout) as con:
            return await query(con)

    async def _bounded(self, work: Coroutine[Any, Any, T], seconds: float) -> T:
        """Await `work` for at most `seconds`; past it, its cleanup goes on in the background."""
        # A plain asyncio.timeout would also wait for asyncpg to cancel the query and release
        # the connection, which on a hung server takes another timeout.
        task = asyncio.get_running_loop().create_task(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=seconds)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise TimeoutError(f"no answer within {seconds}s")
        return task.result()

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(_forget(self._abandoned))

    async def _connect_and_migrate(self) -> None:
        async with self._pool.acquire(timeout=self._timeout) as con:
            if not self._migrated:
                await self._migrate(con)
                self._migrated = True
            else:
                await con.fetchval("SELECT 1")

    async def _migrate(self, con: Any) -> None:
        async with con.transaction():
            # Transaction-scoped, so a replica that dies mid-migration releases it with its
            # connection; the second replica waits, then finds the work done.
            await con.execute("SELECT pg_advisory_xact_lock($1)", self._lock_id)
            # CREATE SCHEMA needs CREATE on the database even when the schema exists, which a
            # role given only a pre-made schema (common on Lakebase) does not have.
            exists = await con.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema
            )
            if not exists:
                await con.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema}")
            await con.execute(
                f"CREATE TABLE IF NOT EXISTS {self._schema}.schema_version ("
                " version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = await con.fetchval(
                f"SELECT coalesce(max(version), 0) FROM {self._schema}.schema_version"
            )
            for version, sql in _MIGRATIONS:
                if version <= current:
                    continue
                await con.execute(sql.format(schema=self._schema))
                await con.execute(
                    f"INSERT INTO {self._schema}.schema_version (version) VALUES ($1)", version
                )
                log.info("index schema %s migrated to version %d", self.schema, version)
            if current > SCHEMA_VERSION:
                log.warning(
                    "index schema %s is at version %d, newer than this proxy's %d",
                    self.schema,
                    current,
                    SCHEMA_VERSION,
                )

    def _mark_down(self, op: str, exc: BaseException) -> None:
        if self._available:
            log.warning(
                "index unavailable (%s during %s); retrying in the background", _describe(exc), op
            )
        self._available = False
        self._ensure_recovery()

    def _ensure_recovery(self) -> None:
        if self._closed or (self._recovery is not None and not self._recovery.done()):
            return
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay = self._retry_initial
        while not self._closed:
            # Jitter keeps replicas that lost the server together from retrying in lockstep.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            try:
                await self._bounded(self._connect_and_migrate(), self._migrate_timeout)
            except Exception as exc:
                self.errors["reconnect"] += 1
                log.debug("index still unavailable: %s", _describe(exc))
                delay = min(delay * 2, self._retry_max)
                continue
            self._available = True
            log.info("index available again")
            return

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            if self._pending and self.available:
                try:
                    await self.flush()
                except IndexUnavailable:
                    pass

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


def _entry(row: Any) -> IndexedEntry:
    return IndexedEntry(
        user=row["user_id"],
        thread_id=row["thread_id"],
        message_id=row["message_id"],
        voice=row["voice"],
        provider=row["provider"],
        path=row["path"],
        content_type=row["content_type"],
        bytes=int(row["bytes"]),
        body_sha256=row["body_sha256"],
        text_sha256=row["text_sha256"],
        created_at=row["created_at"],
        last_hit_at=row["last_hit_at"],
        hits=int(row["hits"]),
    )


def _row_count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 3" or "UPDATE 0".
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError):
        return True
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _OUTAGE_CLASSES and state != _QUERY_CANCELED
    return False


def _describe(exc: BaseException) -> str:
    # Only the type and SQLSTATE: server messages can quote parameter values (user ids).
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} ({state})" if state else type(exc).__name__


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        # Retrieve the outcome so asyncio does not report it as never retrieved.
        if not task.cancelled():
            task.exception()

    return done
