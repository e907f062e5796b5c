"""The index schema on a real PostgreSQL: migrations once and concurrently, schema names."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import ConfigError
from proxy.index.entries import PostgresIndex
from tests.index_support import (
    ALICE,
    KEY,
    MakeIndex,
    make_index_fixture,  # noqa: F401
    meta,
    path_of,
    rows,
)


async def test_migration_twice_and_concurrently(postgres_dsn: str, make_index: MakeIndex) -> None:
    first, second = await asyncio.gather(make_index(), make_index())
    third = await make_index()

    assert first.available and second.available and third.available
    versions = await rows(
        postgres_dsn, "SELECT version FROM tts_cache.schema_version ORDER BY version"
    )
    assert [row["version"] for row in versions] == [1, 2]
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
