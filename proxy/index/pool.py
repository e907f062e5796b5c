"""IndexPool: bounded calls to PostgreSQL, outage detection and background recovery.

Every call is bounded by `timeout_seconds` and raises `IndexUnavailable` instead of waiting on a
slow or absent PostgreSQL, so the caller decides whether to skip and count (recording, hits) or to
fail closed (ownership). asyncpg is imported only once a pool is started.

Every call is one statement or one transaction, so the pool works through a transaction-mode
pooler (PgBouncer `pool_mode = transaction`, as Lakebase's pooler runs): nothing relies on a
session outliving a transaction. A pooler that does not keep prepared statements between
transactions is recognised by the error it causes, and the statement cache is turned off.
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
from proxy.index.rotating_password import PasswordUnavailable, RotatingPassword
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
# A prepared statement missing, or already there, on the server: the connection we prepared it
# on is not the one answering, i.e. a transaction-mode pooler without prepared-statement support.
_LOST_STATEMENT_STATES: Final = frozenset({"26000", "42P05"})
# An idle pooled connection is closed after this long: a pool that grew for a burst gives its
# server slots back (shared with the legacy app). A rotated password never needs one closed:
# PostgreSQL and Lakebase check it at login only, so an open connection stays valid.
IDLE_CONNECTION_SECONDS: Final = 300.0
# asyncpg's default statement cache, per connection.
STATEMENT_CACHE_SIZE: Final = 100


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
        token: RotatingPassword | None = None,
        prepared_statements: bool = True,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 15.0,
        idle_connection_seconds: float = IDLE_CONNECTION_SECONDS,
    ) -> None:
        if timeout_seconds <= 0:
            raise ConfigError("index.timeout_seconds", "must be greater than 0")
        if pool_max_size < 1:
            raise ConfigError("index.pool_max_size", "must be 1 or more")
        quote_schema(schema)  # a bad name fails here, not at the first migration
        self.schema = schema
        self._dsn = dsn or None
        # A rotating token is read by asyncpg for every new connection, like any callable.
        self.token = token
        self._password: Password | None = token if token is not None else password
        self._prepared_statements = prepared_statements
        self._idle_seconds = idle_connection_seconds
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

        if self.token is not None:
            # Bounded: without a token yet, the pool starts unavailable and recovers with it.
            await self.token.start(self._migrate_timeout)
        # min_size=0: creating the pool opens no connection, so it cannot fail on an outage;
        # connections are opened on demand and replaced by the pool when the server drops them.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_max_size,
            max_inactive_connection_lifetime=self._idle_seconds,
            **self._connect_options(),
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
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
        if self.token is not None:
            await self.token.aclose()

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
            elif not await self._lost_statement(exc):
                log.warning("index %s failed%s: %s", op, where, _describe(exc))
            raise IndexUnavailable(f"index {op}: {type(exc).__name__}") from exc

    @contextlib.asynccontextmanager
    async def session_connection(self) -> AsyncIterator[Any]:
        """A connection of its own, outside the pool, for what needs one server session (LISTEN).

        Outside the pool so that a session held for the process's life takes no slot from the
        request path; opened with the pool's options (the rotating password included). Closed
        on exit; IndexUnavailable when it cannot be opened.
        """
        import asyncpg

        if self._closed or not self.available:
            self.errors["session"] += 1
            raise IndexUnavailable("index session: unavailable")
        try:
            con = await self._bounded(
                asyncpg.connect(self._dsn, **self._connect_options()), self._timeout
            )
        except Exception as exc:
            self.errors["session"] += 1
            log.warning("index session connection failed: %s", _describe(exc))
            raise IndexUnavailable(f"index session: {type(exc).__name__}") from exc
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

    def _connect_options(self) -> dict[str, Any]:
        return {
            "password": self._password,
            "timeout": self._timeout,
            "statement_cache_size": STATEMENT_CACHE_SIZE if self._prepared_statements else 0,
            "server_settings": {"application_name": "tts-cache-proxy"},
        }

    async def _lost_statement(self, exc: BaseException) -> bool:
        """Turn the statement cache off when `exc` shows a transaction-mode pooler; True if so."""
        state = str(getattr(exc, "sqlstate", "") or "")
        if state not in _LOST_STATEMENT_STATES:
            return False
        if self._prepared_statements and self._pool is not None:
            self._prepared_statements = False
            log.warning(
                "index: prepared statements do not survive between transactions (%s): PostgreSQL"
                " is behind a transaction-mode pooler; the statement cache is off from now on"
                " (index.prepared_statements = false starts that way)",
                _describe(exc),
            )
            self._pool.set_connect_args(self._dsn, **self._connect_options())
            # Connections in use are closed as they come back; new ones prepare nothing.
            await self._pool.expire_connections()
        return True

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

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the missing rotating token comes back."""
        if self.token is None or self.token.valid:
            await asyncio.sleep(seconds)
        else:
            await self.token.wait_refreshed(seconds)

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
            await self._pause(delay * random.uniform(0.8, 1.2))
            try:
                await self._bounded(self._connect_and_migrate(), self._migrate_timeout)
            except Exception as exc:
                self.errors["reconnect"] += 1
                await self._lost_statement(exc)
                log.debug("index still unavailable: %s", _describe(exc))
                delay = min(delay * 2, self._retry_max)
                continue
            self._available = True
            log.info("index available again")
            return


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError | PasswordUnavailable):
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
