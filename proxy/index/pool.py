"""IndexPool: bounded calls to PostgreSQL, outage detection and background recovery.

Every call is bounded by `timeout_seconds` and raises `IndexUnavailable` instead of waiting on a
slow or absent PostgreSQL, so the caller decides whether to skip and count (recording, hits) or to
fail closed (ownership). asyncpg is imported only once a pool is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, Final, TypeVar

from proxy.config import ConfigError, IndexSettings
from proxy.index.migrations import SCHEMA_VERSION, migrate, quote_schema
from proxy.speak import CacheKey

log = logging.getLogger(__name__)

T = TypeVar("T")

# A string, or a function (sync or async) asyncpg calls for every new connection, so a rotating
# Lakebase OAuth token is read fresh each time a connection is opened.
Password = str | Callable[[], str | Awaitable[str]]
Query = Callable[[Any], Awaitable[T]]

# SQLSTATE classes that mean "the server is not there for us": connection exception, invalid
# authorization (an expired token), insufficient resources, operator intervention (shutdown,
# starting up) and a database that does not exist (yet).
_OUTAGE_CLASSES: Final = frozenset({"08", "28", "53", "57", "3D"})
_QUERY_CANCELED: Final = "57014"


class IndexUnavailable(Exception):
    """The index could not answer in time: PostgreSQL is down, slow, or refused the query."""


def index_enabled(settings: IndexSettings, environ: Mapping[str, str]) -> bool:
    """True when a DSN is configured or the standard PGHOST variable names a server."""
    return bool(settings.dsn or environ.get("PGHOST"))


def row_count(status: str) -> int:
    """The row count of an asyncpg command tag such as "DELETE 3" (0 when it has none)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class IndexPool:
    """An asyncpg pool on a migrated schema: calls bounded and counted, outages recovered."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "tts_cache",
        timeout_seconds: float = 2.0,
        pool_max_size: int = 10,
        password: Password | None = None,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 15.0,
    ) -> None:
        if timeout_seconds <= 0:
            raise ConfigError("index.timeout_seconds", "must be greater than 0")
        if pool_max_size < 1:
            raise ConfigError("index.pool_max_size", "must be 1 or more")
        quote_schema(schema)  # a bad name fails here, not at the first migration
        self.schema = schema
        self._dsn = dsn or None
        self._password = password
        self._timeout = timeout_seconds
        self._pool_max_size = pool_max_size
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        # Waiting for another replica's migration lock is normal at a rolling start.
        self._migrate_timeout = 5 * timeout_seconds

        self.errors: Counter[str] = Counter()
        self._pool: Any = None
        self._available = False
        self._migrated = False
        self._closed = False
        self._recovery: asyncio.Task[None] | None = None
        # Strong references to timed-out work still cleaning up its connection.
        self._abandoned: set[asyncio.Task[Any]] = set()

    @property
    def available(self) -> bool:
        """True while PostgreSQL answers and the schema is migrated."""
        return self._available and not self._closed

    @property
    def closed(self) -> bool:
        """True once aclose() has run: no call succeeds any more."""
        return self._closed

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
        """Stop the recovery, let abandoned work finish (bounded), close the pool."""
        if self._closed:
            return
        import asyncpg

        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
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
            await self.run("ping", lambda con: con.fetchval("SELECT 1"))
        except IndexUnavailable:
            return False
        return True

    async def run(self, op: str, query: Query[T], key: CacheKey | None = None) -> T:
        """`query(connection)` on the pool, bounded, counted under `op`; IndexUnavailable if not."""
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
                await migrate(con, self.schema)
                self._migrated = True
            else:
                await con.fetchval("SELECT 1")

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
