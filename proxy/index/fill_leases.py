"""FillLeases: which replica fills a recording now, one row per fill, with an expiry.

One synthesis per key across replicas (issue 17): the first replica to miss a recording takes
its lease; another that misses finds it held and waits for the holder's recording (see
proxy/fleet/follow.py). A lease may be taken when its row is absent, expired, or held by a
process that is gone. The holder is named as its invalidation session names itself in
`pg_stat_activity` (`application_name`, proxy/fleet/postgres.py): a holder that dies closes its
sessions and loses its leases at once; one that vanishes without closing them (a host lost) at
the expiry. A live holder renews its lease while its fill runs, and gives it back once the
recording is on the Volume (or the fill ended without one).

Not index/lease.py's `Leases` (the janitor's election): a fill lease is taken and given back on
every miss, for keys nobody may ask for again, so it needs a table that is cheap to write and
swept of what crashed holders left (UNLOGGED, migration 4), and takeover by liveness, not only
by expiry, so that a follower does not wait out the expiry of a dead leader.

Every call is one statement: it works through a transaction-mode pooler.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Final

from proxy.index.migrations import quote_schema
from proxy.index.pool import IndexPool
from proxy.speak import CacheKey

log = logging.getLogger(__name__)

# How long a lease lasts unless renewed: only a holder that vanished without closing its
# sessions is waited out this long (a follower gives up earlier, at fleet.wait_seconds).
FILL_LEASE_SECONDS: Final = 30.0
# How often a replica deletes the rows crashed holders left, and how long past their expiry.
SWEEP_SECONDS: Final = 600.0
SWEEP_AFTER_SECONDS: Final = 60.0

_GONE = (
    "NOT EXISTS (SELECT 1 FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name = lease.holder)"
)


def flight_name(key: CacheKey, text_sha256: str, provider: str | None) -> str:
    """The lease's name for one recording: the key, the text and the provider asked for, hashed
    (two texts of one message are two fills, as in `Flights`; the row names no user)."""
    parts = (*key, text_sha256, provider or "")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class FillLeases:
    """The fill leases of one schema, held under `holder` (this process's session name)."""

    def __init__(
        self,
        pool: IndexPool,
        *,
        holder: str,
        seconds: float = FILL_LEASE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.holder = holder
        self.seconds = seconds
        self._clock = clock
        self._table = f"{quote_schema(pool.schema)}.fill_leases"
        self._swept_at = self._clock()

    async def take(self, flight: str) -> bool:
        """Take the lease `flight` when it is free, expired, ours, or its holder is gone.

        IndexUnavailable when PostgreSQL does not answer.
        """
        # One statement: concurrent takers serialize on the row, and exactly one sees it free.
        sql = (
            f"INSERT INTO {self._table} AS lease (flight, holder, expires_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3))"
            " ON CONFLICT (flight) DO UPDATE"
            " SET holder = excluded.holder, expires_at = excluded.expires_at"
            f" WHERE lease.expires_at <= now() OR lease.holder = excluded.holder OR {_GONE}"
            " RETURNING true"
        )
        won = await self.pool.run(
            "fill_lease", lambda con: con.fetchval(sql, flight, self.holder, self.seconds)
        )
        return bool(won)

    async def takeable(self, flight: str) -> bool:
        """Whether `take` could win now (read only: what a waiting replica polls)."""
        sql = (
            f"SELECT lease.expires_at <= now() OR {_GONE}"
            f" FROM {self._table} AS lease WHERE lease.flight = $1"
        )
        free = await self.pool.run("fill_lease", lambda con: con.fetchval(sql, flight))
        return free is None or bool(free)

    async def renew(self, flight: str) -> bool:
        """Extend our lease `flight`; False when it is no longer ours."""
        sql = (
            f"UPDATE {self._table} SET expires_at = now() + make_interval(secs => $3)"
            " WHERE flight = $1 AND holder = $2 RETURNING true"
        )
        renewed = await self.pool.run(
            "fill_lease", lambda con: con.fetchval(sql, flight, self.holder, self.seconds)
        )
        return bool(renewed)

    async def release(self, flight: str) -> None:
        """Give our lease `flight` back; another replica's is left alone."""
        sql = f"DELETE FROM {self._table} WHERE flight = $1 AND holder = $2"
        await self.pool.run("fill_lease", lambda con: con.execute(sql, flight, self.holder))
        if self._clock() - self._swept_at > SWEEP_SECONDS:
            self._swept_at = self._clock()
            await self.sweep()

    async def sweep(self) -> int:
        """Delete the leases that expired a while ago (their holders crashed); how many."""
        sql = (
            f"DELETE FROM {self._table}"
            " WHERE expires_at < now() - make_interval(secs => $1::float8)"
        )
        status = await self.pool.run(
            "fill_lease", lambda con: con.execute(sql, SWEEP_AFTER_SECONDS)
        )
        removed = int(str(status).rsplit(" ", 1)[-1] or 0)
        if removed:
            log.info("fill leases: %d expired row(s) of crashed holders removed", removed)
        return removed
