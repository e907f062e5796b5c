"""Helpers for the index tests: started indexes on the test's database, entries, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from proxy.index.entries import PostgresIndex
from proxy.index.pool import IndexUnavailable
from proxy.speak import CacheKey
from proxy.storage.entry import EntryMeta

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


@pytest.fixture(name="make_index")
async def make_index_fixture(postgres_dsn: str) -> AsyncIterator[MakeIndex]:
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


async def fails_quickly(call: Awaitable[Any]) -> None:
    started = time.monotonic()
    with pytest.raises(IndexUnavailable):
        await call
    assert time.monotonic() - started < TIMEOUT + MARGIN
