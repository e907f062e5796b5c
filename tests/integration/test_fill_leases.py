"""Fill leases on a real PostgreSQL: one holder per recording, taken over when its holder's
session is gone or its lease expired, given back by its holder only, swept when abandoned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from proxy.index.fill_leases import FillLeases, flight_name
from proxy.speak import CacheKey
from tests.index_support import MakeIndex, make_index_fixture, rows  # noqa: F401

KEY = CacheKey("alice@example.com", "t-1", "m-1", "af_nicole")
FLIGHT = flight_name(KEY, "a" * 64, None)


@asynccontextmanager
async def session_named(dsn: str, name: str) -> AsyncIterator[None]:
    """A connection whose application_name is `name`: a live holder, as its LISTEN session is."""
    con = await asyncpg.connect(dsn, server_settings={"application_name": name})
    try:
        yield
    finally:
        await con.close()


async def test_a_live_holder_keeps_its_lease_until_it_gives_it_back(
    make_index: MakeIndex, postgres_dsn: str
) -> None:
    first = FillLeases((await make_index()).pool, holder="tts-fleet x replica-1")
    second = FillLeases((await make_index()).pool, holder="tts-fleet x replica-2")
    async with session_named(postgres_dsn, first.holder):
        assert await first.take(FLIGHT)
        assert not await second.takeable(FLIGHT)
        assert not await second.take(FLIGHT)
        assert await second.take(flight_name(KEY, "b" * 64, None))  # another text: another fill
        await second.release(FLIGHT)  # not its lease: nothing happens
        assert not await second.take(FLIGHT)
        assert await first.renew(FLIGHT)
        await first.release(FLIGHT)
        assert await second.takeable(FLIGHT)
        assert await second.take(FLIGHT)
        assert not await first.renew(FLIGHT)  # no longer its lease


async def test_a_lease_whose_holder_is_gone_is_taken_over_at_once(
    make_index: MakeIndex, postgres_dsn: str
) -> None:
    first = FillLeases((await make_index()).pool, holder="tts-fleet x replica-1")
    second = FillLeases((await make_index()).pool, holder="tts-fleet x replica-2")
    async with session_named(postgres_dsn, first.holder):
        assert await first.take(FLIGHT)
        assert not await second.take(FLIGHT)
    # The holder's session closed (its process died): the lease is free long before its expiry.
    for _ in range(100):
        if await second.takeable(FLIGHT):
            break
        await asyncio.sleep(0.02)
    assert await second.take(FLIGHT)
    holders = await rows(postgres_dsn, "SELECT holder FROM tts_cache.fill_leases")
    assert [row["holder"] for row in holders] == [second.holder]


async def test_an_expired_lease_is_taken_over_even_from_a_live_holder(
    make_index: MakeIndex, postgres_dsn: str
) -> None:
    first = FillLeases((await make_index()).pool, holder="tts-fleet x replica-1", seconds=0.3)
    second = FillLeases((await make_index()).pool, holder="tts-fleet x replica-2")
    async with session_named(postgres_dsn, first.holder):
        assert await first.take(FLIGHT)
        assert not await second.take(FLIGHT)
        await asyncio.sleep(0.4)  # a holder that stopped renewing (a host cut off)
        assert await second.take(FLIGHT)


async def test_a_sweep_removes_only_leases_long_expired(
    make_index: MakeIndex, postgres_dsn: str
) -> None:
    leases = FillLeases((await make_index()).pool, holder="tts-fleet x replica-1")
    assert await leases.take(FLIGHT)
    await rows(
        postgres_dsn,
        "INSERT INTO tts_cache.fill_leases (flight, holder, expires_at)"
        " VALUES ('crashed', 'gone', now() - interval '2 minutes'),"
        " ('lately', 'gone', now() - interval '5 seconds')",
    )
    assert await leases.sweep() == 1
    left = await rows(postgres_dsn, "SELECT flight FROM tts_cache.fill_leases ORDER BY flight")
    assert [row["flight"] for row in left] == sorted([FLIGHT, "lately"])
