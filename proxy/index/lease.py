"""Lease: one replica's hold on a named job (the janitor), a row with an expiry in the index.

A session-level advisory lock is wrong behind a transaction-mode pooler: the pooler hands the
server session that holds the lock to other clients, which then "hold" it too, and the unlock
may run on another session and leak it. A lease is one statement at a time, so it works through
any pooler: taken when free or expired, renewed by its holder, given back at the end.

The invariant it protects: two replicas never delete at once. Expiry is the server's clock
(`now()`); the holder's own deadline is measured from before it sent the statement that set the
expiry, so it always ends before the server lets anyone else take the lease. A holder deletes
only before its deadline, renews once half the lease has gone, and stops for good once a renewal
fails (lost to another replica, or the index unreachable).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Final

from proxy.index.migrations import quote_schema
from proxy.index.pool import IndexPool, IndexUnavailable

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS: Final = 60.0


def holder_name() -> str:
    """This process's name in the leases table: host, pid and a random part (unique per start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Leases:
    """The leases table of one schema, on an IndexPool."""

    def __init__(self, pool: IndexPool, *, holder: str | None = None) -> None:
        self.pool = pool
        self.holder = holder or holder_name()
        self._table = f"{quote_schema(pool.schema)}.leases"

    async def acquire(self, name: str, seconds: float) -> Lease | None:
        """The lease `name` for `seconds` when it is free, expired or ours; None when not."""
        # One statement: concurrent takers serialize on the row, and exactly one sees it free.
        sql = (
            f"INSERT INTO {self._table} AS lease (name, holder, expires_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3))"
            " ON CONFLICT (name) DO UPDATE"
            " SET holder = excluded.holder, expires_at = excluded.expires_at,"
            " acquired_at = now()"
            " WHERE lease.expires_at <= now() OR lease.holder = excluded.holder"
            " RETURNING expires_at"
        )
        sent = time.monotonic()
        won = await self.pool.run(
            "lease", lambda con: con.fetchval(sql, name, self.holder, seconds)
        )
        if won is None:
            return None
        return Lease(self, name, seconds, deadline=sent + seconds)

    async def renew(self, name: str, seconds: float) -> float | None:
        """Extend our unexpired lease `name`; its new local deadline, or None when it is gone."""
        sql = (
            f"UPDATE {self._table} SET expires_at = now() + make_interval(secs => $3)"
            " WHERE name = $1 AND holder = $2 AND expires_at > now()"
            " RETURNING expires_at"
        )
        sent = time.monotonic()
        renewed = await self.pool.run(
            "lease", lambda con: con.fetchval(sql, name, self.holder, seconds)
        )
        return None if renewed is None else sent + seconds

    async def release(self, name: str) -> None:
        """Give our lease `name` back, so any replica may take it at once."""
        sql = f"DELETE FROM {self._table} WHERE name = $1 AND holder = $2"
        await self.pool.run("lease", lambda con: con.execute(sql, name, self.holder))


class Lease:
    """A lease held: `confirm()` before each deletion says whether this replica may go on."""

    def __init__(
        self,
        leases: Leases,
        name: str,
        seconds: float,
        *,
        deadline: float,
    ) -> None:
        self._leases = leases
        self.name = name
        self.seconds = seconds
        self._deadline = deadline
        self._lost = False

    @property
    def held(self) -> bool:
        """True until the local deadline, unless a renewal found the lease gone."""
        return not self._lost and time.monotonic() < self._deadline

    async def confirm(self) -> bool:
        """True while this replica may delete: held, and renewed once half of it has gone."""
        if not self.held:
            self._lose("expired before it was renewed")
            return False
        if self._deadline - time.monotonic() > self.seconds / 2:
            return True
        try:
            deadline = await self._leases.renew(self.name, self.seconds)
        except IndexUnavailable:
            self._lose("the index did not answer its renewal")
            return False
        if deadline is None:
            self._lose("another replica holds it")
            return False
        self._deadline = deadline
        return True

    async def release(self) -> None:
        """Give the lease back (a failure only leaves it to expire)."""
        self._lost = True
        try:
            await self._leases.release(self.name)
        except IndexUnavailable:
            log.debug("lease %s left to expire: the index did not answer", self.name)

    def _lose(self, why: str) -> None:
        if not self._lost:
            log.warning("lease %s lost (%s): this replica stops deleting", self.name, why)
        self._lost = True
