"""The index's pool on a real PostgreSQL: bounded calls, outages, recovery, DSN and password."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import pytest

from proxy.config import IndexSettings
from proxy.index.entries import PostgresIndex
from proxy.index.legacy import LegacyMessages
from proxy.index.pool import IndexUnavailable
from tests.index_support import (
    ALICE,
    KEY,
    MARGIN,
    TIMEOUT,
    MakeIndex,
    eventually,
    fails_quickly,
    make_index_fixture,  # noqa: F401
    meta,
    path_of,
    rows,
)
from tests.pg import (
    ChatMessage,
    PostgresServer,
    create_chat_messages,
    set_password_role,
)


async def test_server_stopped_mid_test_then_restarted(
    postgres_server: PostgresServer,
    postgres_dsn: str,
    make_index: MakeIndex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.index")
    await create_chat_messages(postgres_dsn, [ChatMessage("m-123", ALICE, "t-9", "hello")])
    index = await make_index()
    legacy = LegacyMessages(index.pool)
    await index.record(KEY, meta(created_at=1_700_000_000), path_of(KEY))
    assert await index.ping() is True

    await asyncio.to_thread(postgres_server.stop)
    try:
        await fails_quickly(legacy.owns(ALICE, "m-123"))
        await fails_quickly(index.record(KEY, meta(), path_of(KEY)))
        await fails_quickly(index.list_entries())
        await fails_quickly(index.stats())
        await fails_quickly(legacy.write_metadata(KEY, "/v", "replicate", time.time()))
        assert await index.ping() is False
        assert index.available is False
        await index.touch(KEY)  # a hit during the outage is kept for later, and never raises
        assert index.errors["owns"] >= 1
    finally:
        await asyncio.to_thread(postgres_server.start)

    await eventually(index.ping)
    assert await legacy.owns(ALICE, "m-123") is True
    await index.flush()
    assert (await index.list_entries(user=ALICE))[0].hits == 1
    assert ALICE not in caplog.text
    assert "m-123" not in caplog.text


async def test_a_hung_server_costs_one_timeout_then_fails_fast(
    postgres_server: PostgresServer,
    postgres_dsn: str,
    make_index: MakeIndex,
) -> None:
    await create_chat_messages(postgres_dsn, [ChatMessage("m-123", ALICE, "t-9", "hello")])
    index = await make_index()
    legacy = LegacyMessages(index.pool)
    assert await legacy.owns(ALICE, "m-123") is True

    await asyncio.to_thread(postgres_server.pause)
    try:
        await fails_quickly(legacy.owns(ALICE, "m-123"))
        started = time.monotonic()
        with pytest.raises(IndexUnavailable):
            await legacy.owns(ALICE, "m-123")
        # Once one call timed out the index is marked down: the next ones do not wait at all.
        assert time.monotonic() - started < 0.05
        assert await index.ping() is False
    finally:
        await asyncio.to_thread(postgres_server.resume)

    await eventually(index.ping)
    assert await legacy.owns(ALICE, "m-123") is True


async def test_a_slow_query_is_cut_at_the_timeout(
    postgres_dsn: str,
    make_index: MakeIndex,
) -> None:
    slow = "SELECT 1 FROM pg_sleep(3) WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL"
    index = await make_index()
    legacy = LegacyMessages(index.pool, ownership_query=slow)
    await fails_quickly(legacy.owns(ALICE, "m-123"))
    await eventually(index.ping)


async def test_start_with_the_server_down(
    postgres_server: PostgresServer,
    make_index: MakeIndex,
) -> None:
    await asyncio.to_thread(postgres_server.stop)
    try:
        started = time.monotonic()
        index = await make_index()  # start() must not raise
        assert time.monotonic() - started < TIMEOUT + MARGIN
        assert index.available is False
        await fails_quickly(index.record(KEY, meta(), path_of(KEY)))
        assert await index.ping() is False
    finally:
        await asyncio.to_thread(postgres_server.start)

    await eventually(index.ping)
    await index.record(KEY, meta(), path_of(KEY))
    assert [entry.key for entry in await index.list_entries()] == [KEY]


async def test_dsn_from_the_standard_pg_variables(
    postgres_server: PostgresServer,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parts = urlsplit(postgres_dsn)
    monkeypatch.setenv("PGHOST", parts.hostname or "")
    monkeypatch.setenv("PGPORT", str(parts.port))
    monkeypatch.setenv("PGUSER", parts.username or "")
    monkeypatch.setenv("PGDATABASE", parts.path.lstrip("/"))
    if parts.password:
        monkeypatch.setenv("PGPASSWORD", parts.password)
    index = PostgresIndex.from_settings(IndexSettings(dsn="", schema="from_env"))
    try:
        await index.start()
        assert index.available
        await index.record(KEY, meta(), path_of(KEY))
    finally:
        await index.aclose()
    found = await rows(postgres_dsn, "SELECT count(*) AS n FROM from_env.tts_cache_entries")
    assert found[0]["n"] == 1


async def test_callable_password_and_rotation(
    postgres_server: PostgresServer,
    postgres_dsn: str,
    make_index: MakeIndex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not postgres_server.owned:
        pytest.skip("password checks need the cluster this session configured")
    caplog.set_level(logging.DEBUG, logger="proxy.index")
    token = "lakebase-token-1"
    role_dsn = await set_password_role(postgres_dsn, token)
    calls = 0

    async def fresh_token() -> str:
        nonlocal calls
        calls += 1
        return token

    index = await make_index(role_dsn, password=fresh_token)
    assert index.available
    await index.record(KEY, meta(), path_of(KEY))
    assert calls >= 1

    current = {"token": "expired-token"}
    rotated = await make_index(role_dsn, password=lambda: current["token"], schema="rotated")
    assert rotated.available is False
    await fails_quickly(rotated.list_entries())

    current["token"] = token  # the token source catches up; the next connection uses it
    await eventually(rotated.ping)
    assert await rotated.list_entries() == []
    assert token not in caplog.text and "expired-token" not in caplog.text
