"""The index schema on a real PostgreSQL: migrations once and concurrently, schema names."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.config import ConfigError
from proxy.index.entries import PostgresIndex
from proxy.index.migrations import MIGRATIONS
from tests.index_support import (
    ALICE,
    KEY,
    MakeIndex,
    make_index_fixture,  # noqa: F401
    meta,
    path_of,
    rows,
)


async def test_a_schema_at_version_1_is_brought_up_keeping_its_rows(
    postgres_dsn: str, make_index: MakeIndex
) -> None:
    # What a proxy before the leases table left: version 1 and an entry in it.
    con = await asyncpg.connect(postgres_dsn)
    try:
        await con.execute("CREATE SCHEMA tts_cache")
        await con.execute(
            "CREATE TABLE tts_cache.schema_version (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await con.execute(MIGRATIONS[0][1].format(schema='"tts_cache"'))
        await con.execute("INSERT INTO tts_cache.schema_version (version) VALUES (1)")
        await con.execute(
            "INSERT INTO tts_cache.tts_cache_entries (user_id, thread_id, message_id, voice,"
            " path, content_type, bytes, body_sha256, text_sha256)"
            " VALUES ($1, $2, $3, $4, '/v', 'audio/mpeg', 1000, 'b', 'a')",
            KEY.user,
            KEY.thread_id,
            KEY.message_id,
            KEY.voice,
        )
    finally:
        await con.close()

    index = await make_index()
    assert [entry.key for entry in await index.list_entries()] == [KEY]
    leases = await rows(postgres_dsn, "SELECT count(*) AS n FROM tts_cache.leases")
    assert leases[0]["n"] == 0
    versions = await rows(postgres_dsn, "SELECT max(version) AS v FROM tts_cache.schema_version")
    assert versions[0]["v"] == MIGRATIONS[-1][0]


async def test_migration_twice_and_concurrently(postgres_dsn: str, make_index: MakeIndex) -> None:
    first, second = await asyncio.gather(make_index(), make_index())
    third = await make_index()

    assert first.available and second.available and third.available
    versions = await rows(
        postgres_dsn, "SELECT version FROM tts_cache.schema_version ORDER BY version"
    )
    assert [row["version"] for row in versions] == [version for version, _ in MIGRATIONS]
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
    postgres_dsn: str,
    make_index: MakeIndex,
) -> None:
    index = await make_index(schema="Tts_Custom")
    await index.record(KEY, meta(), path_of(KEY))

    found = await rows(postgres_dsn, 'SELECT user_id FROM "Tts_Custom".tts_cache_entries')
    assert [row["user_id"] for row in found] == [ALICE]
    for bad in ('x"; DROP TABLE chat_messages; --', "a.b", "", "9lives", "x" * 64):
        with pytest.raises(ConfigError, match=r"index\.schema"):
            PostgresIndex(postgres_dsn, schema=bad)
