"""The index through a real PgBouncer in transaction mode: statements, migrations, the lease."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.index.entries import PostgresIndex
from proxy.index.lease import Leases
from proxy.index.migrations import MIGRATIONS
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from tests.index_support import MakeIndex, make_index_fixture, meta, path_of, rows  # noqa: F401
from tests.pgbouncer import PgBouncer, pgbouncer_fixture  # noqa: F401


def keys(n: int) -> list[CacheKey]:
    return [CacheKey("alice@example.com", "t-1", f"m-{i}", "af_nicole") for i in range(n)]


async def busy(index: PostgresIndex, n: int = 24) -> list[BaseException | None]:
    """`n` concurrent index calls (writes and reads); each one's exception, or None."""

    async def one(i: int, key: CacheKey) -> None:
        if i % 2:
            await index.record(key, meta(), path_of(key))
        else:
            await index.list_entries(user=key.user)

    found = await asyncio.gather(
        *(one(i, key) for i, key in enumerate(keys(n))), return_exceptions=True
    )
    return [result if isinstance(result, BaseException) else None for result in found]


async def test_prepared_statements_are_turned_off_at_the_first_sign_of_the_pooler(
    pgbouncer: PgBouncer,
    postgres_dsn: str,
    make_index: MakeIndex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.index")
    index = await make_index(pgbouncer.dsn_for(postgres_dsn), pool_max_size=6)
    assert index.available  # migrating is one transaction: fine through the pooler

    failed: list[BaseException] = []
    for _ in range(20):
        failed += [exc for exc in await busy(index) if exc is not None]
        if "transaction-mode pooler" in caplog.text:
            break
    # The statements one server session prepared were missing on the next: skipped, counted.
    assert failed and all(isinstance(exc, IndexUnavailable) for exc in failed)
    assert caplog.text.count("the statement cache is off") == 1

    for _ in range(5):
        assert await busy(index) == [None] * 24
    assert index.available
    assert caplog.text.count("the statement cache is off") == 1


async def test_without_prepared_statements_nothing_fails_through_the_pooler(
    pgbouncer: PgBouncer, postgres_dsn: str, make_index: MakeIndex
) -> None:
    through = pgbouncer.dsn_for(postgres_dsn)
    first, second = await asyncio.gather(
        make_index(through, pool_max_size=6, prepared_statements=False),
        make_index(through, pool_max_size=6, prepared_statements=False),
    )
    assert first.available and second.available  # two migrations at once, one after the other
    versions = await rows(postgres_dsn, "SELECT version FROM tts_cache.schema_version ORDER BY 1")
    assert [row["version"] for row in versions] == [version for version, _ in MIGRATIONS]
    for _ in range(5):
        assert await busy(first) == [None] * 24
    assert sum(first.errors.values()) == 0


async def test_the_janitor_lease_has_one_holder_through_the_pooler(
    pgbouncer: PgBouncer, postgres_dsn: str, make_index: MakeIndex
) -> None:
    # Session advisory locks are shared through this pooler: the server session holding one
    # serves every client in turn, and each of them "wins" it. The lease is one row.
    through = pgbouncer.dsn_for(postgres_dsn)
    pools = [(await make_index(through, prepared_statements=False)).pool for _ in range(3)]
    leases = [Leases(pool, holder=f"replica-{n}") for n, pool in enumerate(pools)]
    won = await asyncio.gather(*(lease.acquire("janitor", 1.0) for lease in leases))
    held = [lease for lease in won if lease is not None]
    assert len(held) == 1
    await asyncio.sleep(1.1)
    assert not held[0].held
    again = await asyncio.gather(*(lease.acquire("janitor", 1.0) for lease in leases))
    assert len([lease for lease in again if lease is not None]) == 1
