"""PostgresIndex on a real PostgreSQL: migrations, entries, ownership, legacy metadata, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from proxy.config import ConfigError, IndexSettings
from proxy.speak import CacheKey
from proxy.storage.entry import EntryMeta
from proxy.storage.index import IndexUnavailable, PostgresIndex
from tests.pg import (
    ChatMessage,
    PostgresServer,
    create_chat_messages,
    message_metadata,
    postgres_dsn,  # noqa: F401
    postgres_server,  # noqa: F401
    set_password_role,
)

ALICE = "alice@example.com"
BOB = "bob@example.com"
KEY = CacheKey(ALICE, "t-9", "m-123", "af_nicole")
TIMEOUT = 0.5
# Generous against a loaded CI machine, still far below the default two seconds per call.
MARGIN = 0.5

MakeIndex = Callable[..., Awaitable[PostgresIndex]]


def meta(
    length: int = 1000, provider: str | None = "replicate", created_at: float = 0.0
) -> EntryMeta:
    return EntryMeta(
        content_type="audio/mpeg",
        length=length,
        body_sha256="b" * 64,
        text_sha256="a" * 64,
        provider=provider,
        created_at=created_at or time.time(),
    )


def path_of(key: CacheKey) -> str:
    parts = (key.user, key.thread_id, key.message_id, key.voice)
    return "/Volumes/main/tts/cache/tts_audio/" + "/".join(parts) + ".mp3"


@pytest.fixture
async def make_index(postgres_dsn: str) -> AsyncIterator[MakeIndex]:  # noqa: F811
    """A factory of started indexes on the test's database (fast timeouts), closed after it."""
    made: list[PostgresIndex] = []

    async def make(dsn: str | None = None, *, start: bool = True, **options: Any) -> PostgresIndex:
        options.setdefault("timeout_seconds", TIMEOUT)
        options.setdefault("flush_interval_seconds", 0.1)
        options.setdefault("retry_initial_seconds", 0.1)
        options.setdefault("retry_max_seconds", 0.3)
        index = PostgresIndex(postgres_dsn if dsn is None else dsn, **options)
        made.append(index)
        if start:
            await index.start()
        return index

    yield make
    for index in made:
        await index.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> float:
    """Poll `check` until it is true; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"not true within {within}s")


async def rows(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return list(await con.fetch(sql, *args))
    finally:
        await con.close()


async def test_migration_twice_and_concurrently(postgres_dsn: str, make_index: MakeIndex) -> None:  # noqa: F811
    first, second = await asyncio.gather(make_index(), make_index())
    third = await make_index()

    assert first.available and second.available and third.available
    versions = await rows(postgres_dsn, "SELECT version FROM tts_cache.schema_version")
    assert [row["version"] for row in versions] == [1]
    indexes = await rows(
        postgres_dsn,
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'tts_cache'"
        " AND tablename = 'tts_cache_entries' ORDER BY indexname",
    )
    definitions = " ".join(row["indexdef"] for row in indexes)
    assert "(user_id, thread_id, message_id, voice)" in definitions
    assert "(last_hit_at)" in definitions
    assert "(user_id, created_at DESC)" in definitions


async def test_custom_schema_and_hostile_schema_names(
    postgres_dsn: str,  # noqa: F811
    make_index: MakeIndex,
) -> None:
    index = await make_index(schema="Tts_Custom")
    await index.record(KEY, meta(), path_of(KEY))

    found = await rows(postgres_dsn, 'SELECT user_id FROM "Tts_Custom".tts_cache_entries')
    assert [row["user_id"] for row in found] == [ALICE]
    for bad in ('x"; DROP TABLE chat_messages; --', "a.b", "", "9lives", "x" * 64):
        with pytest.raises(ConfigError, match=r"index\.schema"):
            PostgresIndex(postgres_dsn, schema=bad)


async def test_record_list_and_upsert(make_index: MakeIndex) -> None:
    index = await make_index()
    other_voice = CacheKey(ALICE, "t-9", "m-123", "bf_emma")
    other_thread = CacheKey(ALICE, "t-10", "m-7", "af_nicole")
    bobs = CacheKey(BOB, "t-1", "m-1", "af_nicole")
    for number, key in enumerate((KEY, other_voice, other_thread, bobs)):
        await index.record(
            key, meta(length=100 + number, created_at=1_700_000_000 + number), path_of(key)
        )

    everything = await index.list_entries()
    assert [entry.key for entry in everything] == [bobs, other_thread, other_voice, KEY]
    alices = await index.list_entries(user=ALICE)
    assert {entry.key for entry in alices} == {KEY, other_voice, other_thread}
    assert [e.key for e in await index.list_entries(user=ALICE, thread_id="t-9")] == [
        other_voice,
        KEY,
    ]
    assert [e.key for e in await index.list_entries(user=ALICE, voice="bf_emma")] == [other_voice]
    assert [e.key for e in await index.list_entries(limit=2, offset=1)] == [
        other_thread,
        other_voice,
    ]
    assert await index.list_entries(user="nobody@example.com") == []

    (entry,) = await index.list_entries(user=ALICE, message_id="m-123", voice="af_nicole")
    assert entry.path == path_of(KEY)
    assert entry.bytes == 100
    assert entry.provider == "replicate"
    assert entry.content_type == "audio/mpeg"
    assert entry.body_sha256 == "b" * 64 and entry.text_sha256 == "a" * 64
    assert entry.created_at == datetime.fromtimestamp(1_700_000_000, UTC)
    assert entry.last_hit_at == entry.created_at
    assert entry.hits == 0

    # An edited message is stored again under the same key: one row, the new recording.
    await index.record(KEY, meta(length=555, provider="deepgram"), path_of(KEY))
    (replaced,) = await index.list_entries(user=ALICE, message_id="m-123", voice="af_nicole")
    assert (replaced.bytes, replaced.provider, replaced.hits) == (555, "deepgram", 0)
    assert len(await index.list_entries()) == 4

    with pytest.raises(ValueError):
        await index.list_entries(limit=0)
    with pytest.raises(ValueError):
        await index.list_entries(offset=-1)


async def test_touch_is_buffered_then_flushed(make_index: MakeIndex) -> None:
    index = await make_index(flush_interval_seconds=3600)
    await index.record(KEY, meta(created_at=1_700_000_000), path_of(KEY))

    started = time.perf_counter()
    for _ in range(3):
        await index.touch(KEY)
    assert time.perf_counter() - started < 0.01
    assert index.pending_touches == 1
    assert (await index.list_entries(user=ALICE))[0].hits == 0

    assert await index.flush() == 1
    (entry,) = await index.list_entries(user=ALICE)
    assert entry.hits == 3
    assert entry.last_hit_at > entry.created_at
    assert index.pending_touches == 0
    assert await index.flush() == 0


async def test_touch_is_flushed_in_the_background(make_index: MakeIndex) -> None:
    index = await make_index(flush_interval_seconds=0.1)
    await index.record(KEY, meta(), path_of(KEY))

    await index.touch(KEY)
    await index.touch(CacheKey(BOB, "t", "never-stored", "af_nicole"))

    async def counted() -> bool:
        return (await index.list_entries(user=ALICE))[0].hits == 1

    await eventually(counted, within=3.0)
    assert index.pending_touches == 0


async def test_remove_and_remove_prefix(make_index: MakeIndex) -> None:
    index = await make_index()
    keys = [
        CacheKey(ALICE, "t-1", "m-1", "af_nicole"),
        CacheKey(ALICE, "t-1", "m-1", "bf_emma"),
        CacheKey(ALICE, "t-1", "m-2", "af_nicole"),
        CacheKey(ALICE, "t-2", "m-3", "af_nicole"),
        CacheKey(BOB, "t-1", "m-1", "af_nicole"),
    ]
    for key in keys:
        await index.record(key, meta(), path_of(key))

    assert await index.remove(keys[0]) is True
    assert await index.remove(keys[0]) is False
    assert await index.remove_prefix(ALICE, "t-1", "m-1") == 1
    assert await index.remove_prefix(ALICE, "t-1") == 1
    assert await index.remove_prefix(ALICE) == 1
    assert await index.remove_prefix(ALICE) == 0
    assert [entry.key for entry in await index.list_entries()] == [keys[4]]


async def test_stats_totals_and_top_users(make_index: MakeIndex) -> None:
    index = await make_index()
    empty = await index.stats()
    assert (empty.entries, empty.bytes, empty.hits, empty.top_users) == (0, 0, 0, ())

    for number in range(22):
        user = f"user{number:02d}@example.com"
        for message in range(2):
            key = CacheKey(user, "t", f"m-{message}", "af_nicole")
            await index.record(key, meta(length=1000 * (number + 1)), path_of(key))
    await index.touch(CacheKey("user21@example.com", "t", "m-0", "af_nicole"))
    await index.flush()

    stats = await index.stats()
    assert stats.entries == 44
    assert stats.bytes == 2 * sum(1000 * (n + 1) for n in range(22))
    assert stats.hits == 1
    assert len(stats.top_users) == 20
    assert stats.top_users[0].user == "user21@example.com"
    assert (stats.top_users[0].entries, stats.top_users[0].bytes) == (2, 44_000)
    assert [usage.bytes for usage in stats.top_users] == sorted(
        (usage.bytes for usage in stats.top_users), reverse=True
    )
    assert "user00@example.com" not in {usage.user for usage in stats.top_users}


async def test_ownership(postgres_dsn: str, make_index: MakeIndex) -> None:  # noqa: F811
    index = await make_index()
    with pytest.raises(IndexUnavailable):
        # No chat_messages table: the index cannot tell, and says so rather than guess.
        await index.owns(ALICE, "m-123")
    assert await index.ping() is True

    await create_chat_messages(postgres_dsn, [ChatMessage("m-123", ALICE, "t-9", "hello")])
    assert await index.owns(ALICE, "m-123") is True
    assert await index.owns(BOB, "m-123") is False
    assert await index.owns(ALICE, "m-missing") is False

    exists_style = await make_index(
        ownership_query="SELECT EXISTS(SELECT 1 FROM chat_messages"
        " WHERE message_id = $1 AND user_id = $2)"
    )
    assert await exists_style.owns(ALICE, "m-123") is True
    assert await exists_style.owns(BOB, "m-123") is False


async def test_legacy_metadata_only_on_the_owners_row(
    postgres_dsn: str,  # noqa: F811
    make_index: MakeIndex,
) -> None:
    await create_chat_messages(
        postgres_dsn,
        [
            ChatMessage("m-123", ALICE, "t-9", "hello", {"feedback": "up", "tokens": 12}),
            ChatMessage("m-null", ALICE, "t-9", "no metadata yet"),
        ],
    )
    index = await make_index()
    volume_path = path_of(KEY)
    cached_at = datetime(2026, 5, 20, 12, 30, tzinfo=UTC)

    bobs_key = CacheKey(BOB, "t-9", "m-123", "af_nicole")
    assert await index.write_legacy_metadata(bobs_key, "/evil", "replicate", cached_at) is False
    assert await message_metadata(postgres_dsn, "m-123") == {"feedback": "up", "tokens": 12}

    assert await index.write_legacy_metadata(KEY, volume_path, "replicate", cached_at) is True
    assert await message_metadata(postgres_dsn, "m-123") == {
        "feedback": "up",
        "tokens": 12,
        "tts_cache": {
            "volume_path": volume_path,
            "voice": "af_nicole",
            "provider": "replicate",
            "cached_at": "2026-05-20T12:30:00+00:00",
        },
    }

    null_key = CacheKey(ALICE, "t-9", "m-null", "bf_emma")
    assert await index.write_legacy_metadata(null_key, "/v/p", "deepgram", 1_700_000_000.0) is True
    tts_cache = (await message_metadata(postgres_dsn, "m-null") or {})["tts_cache"]
    assert tts_cache["voice"] == "bf_emma"
    assert tts_cache["cached_at"] == datetime.fromtimestamp(1_700_000_000, UTC).isoformat()

    missing = CacheKey(ALICE, "t-9", "m-missing", "af_nicole")
    assert await index.write_legacy_metadata(missing, "/v/p", "replicate", cached_at) is False


async def _fails_quickly(call: Awaitable[Any]) -> None:
    started = time.monotonic()
    with pytest.raises(IndexUnavailable):
        await call
    assert time.monotonic() - started < TIMEOUT + MARGIN


async def test_server_stopped_mid_test_then_restarted(
    postgres_server: PostgresServer,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
    make_index: MakeIndex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.storage.index")
    await create_chat_messages(postgres_dsn, [ChatMessage("m-123", ALICE, "t-9", "hello")])
    index = await make_index()
    await index.record(KEY, meta(created_at=1_700_000_000), path_of(KEY))
    assert await index.ping() is True

    await asyncio.to_thread(postgres_server.stop)
    try:
        await _fails_quickly(index.owns(ALICE, "m-123"))
        await _fails_quickly(index.record(KEY, meta(), path_of(KEY)))
        await _fails_quickly(index.list_entries())
        await _fails_quickly(index.stats())
        await _fails_quickly(index.write_legacy_metadata(KEY, "/v", "replicate", time.time()))
        assert await index.ping() is False
        assert index.available is False
        await index.touch(KEY)  # a hit during the outage is kept for later, and never raises
        assert index.errors["owns"] >= 1
    finally:
        await asyncio.to_thread(postgres_server.start)

    await eventually(index.ping)
    assert await index.owns(ALICE, "m-123") is True
    await index.flush()
    assert (await index.list_entries(user=ALICE))[0].hits == 1
    assert ALICE not in caplog.text
    assert "m-123" not in caplog.text


async def test_a_hung_server_costs_one_timeout_then_fails_fast(
    postgres_server: PostgresServer,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
    make_index: MakeIndex,
) -> None:
    await create_chat_messages(postgres_dsn, [ChatMessage("m-123", ALICE, "t-9", "hello")])
    index = await make_index()
    assert await index.owns(ALICE, "m-123") is True

    await asyncio.to_thread(postgres_server.pause)
    try:
        await _fails_quickly(index.owns(ALICE, "m-123"))
        started = time.monotonic()
        with pytest.raises(IndexUnavailable):
            await index.owns(ALICE, "m-123")
        # Once one call timed out the index is marked down: the next ones do not wait at all.
        assert time.monotonic() - started < 0.05
        assert await index.ping() is False
    finally:
        await asyncio.to_thread(postgres_server.resume)

    await eventually(index.ping)
    assert await index.owns(ALICE, "m-123") is True


async def test_a_slow_query_is_cut_at_the_timeout(
    postgres_dsn: str,  # noqa: F811
    make_index: MakeIndex,
) -> None:
    slow = "SELECT 1 FROM pg_sleep(3) WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL"
    index = await make_index(ownership_query=slow)
    await _fails_quickly(index.owns(ALICE, "m-123"))
    await eventually(index.ping)


async def test_start_with_the_server_down(
    postgres_server: PostgresServer,  # noqa: F811
    make_index: MakeIndex,
) -> None:
    await asyncio.to_thread(postgres_server.stop)
    try:
        started = time.monotonic()
        index = await make_index()  # start() must not raise
        assert time.monotonic() - started < TIMEOUT + MARGIN
        assert index.available is False
        await _fails_quickly(index.record(KEY, meta(), path_of(KEY)))
        assert await index.ping() is False
    finally:
        await asyncio.to_thread(postgres_server.start)

    await eventually(index.ping)
    await index.record(KEY, meta(), path_of(KEY))
    assert [entry.key for entry in await index.list_entries()] == [KEY]


async def test_dsn_from_the_standard_pg_variables(
    postgres_server: PostgresServer,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
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
    postgres_server: PostgresServer,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
    make_index: MakeIndex,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not postgres_server.owned:
        pytest.skip("password checks need the cluster this session configured")
    caplog.set_level(logging.DEBUG, logger="proxy.storage.index")
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
    await _fails_quickly(rotated.list_entries())

    current["token"] = token  # the token source catches up; the next connection uses it
    await eventually(rotated.ping)
    assert await rotated.list_entries() == []
    assert token not in caplog.text and "expired-token" not in caplog.text
