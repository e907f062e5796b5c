"""The proxy with a real PostgreSQL index: rows recorded, ownership enforced, legacy metadata."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from proxy.app import create_app
from proxy.state import CACHE, INDEX
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.pg import ChatMessage, PostgresServer, create_chat_messages, message_metadata
from tests.support import ALICE, BOB, SPEAK, settle
from tests.support import speak_body as body


async def speak(client: Any, payload: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
    async with client.post(SPEAK, json=payload, headers=headers) as response:
        await response.read()
        return response.status, response.headers["X-TTS-Cache"]


async def proxy_with_index(
    aiohttp_client: Any, backend: FakeLegacyBackend, tmp_path: Path, dsn: str, **extra: Any
) -> Any:
    settings = settings_for(
        tmp_path,
        backend.url,
        **{"index.dsn": dsn, "index.timeout_seconds": 0.5, **extra},
    )
    return await aiohttp_client(create_app(settings))


async def rows(dsn: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        return list(
            await connection.fetch(
                "SELECT user_id, thread_id, message_id, voice, path, bytes, provider"
                " FROM tts_cache.tts_cache_entries ORDER BY user_id"
            )
        )
    finally:
        await connection.close()


async def test_stored_entries_are_recorded_in_the_index(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    client = await proxy_with_index(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert await speak(client, body(provider="replicate"), ALICE) == (200, "miss")
    await settle(client.app)
    (row,) = await rows(postgres_dsn)
    assert (row["user_id"], row["thread_id"], row["message_id"], row["voice"]) == (
        "alice@example.com",
        "t-1",
        "m-1",
        "af_nicole",
    )
    assert row["bytes"] == len(FakeLegacyBackend.audio_for("Hello there", "af_nicole"))
    assert row["provider"] == "replicate"
    assert str(tmp_path) in row["path"] and row["path"].endswith("af_nicole.mp3")

    assert await speak(client, body(), ALICE) == (200, "hit")
    index = client.app[INDEX]
    await index.flush()
    connection = await asyncpg.connect(postgres_dsn)
    try:
        hits = await connection.fetchval("SELECT hits FROM tts_cache.tts_cache_entries")
    finally:
        await connection.close()
    assert hits == 1


async def test_ownership_is_enforced_and_legacy_metadata_written_for_the_owner(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    await create_chat_messages(
        postgres_dsn, [ChatMessage("m-1", "alice@example.com", "t-1", metadata={"kept": 1})]
    )
    client = await proxy_with_index(
        aiohttp_client,
        legacy_backend,
        tmp_path,
        postgres_dsn,
        **{"index.verify_ownership": True, "index.write_legacy_metadata": True},
    )
    # Bob asks for Alice's message: never cached, never served from her entry.
    assert await speak(client, body(), BOB) == (200, "disabled")
    assert await speak(client, body(), ALICE) == (200, "miss")
    assert await speak(client, body(), ALICE) == (200, "hit")
    assert await speak(client, body(), BOB) == (200, "disabled")
    async with client.get("/_proxy/audio/t-1/m-1/af_nicole", headers=BOB) as response:
        assert response.status == 404
    async with client.get("/_proxy/audio/t-1/m-1/af_nicole", headers=ALICE) as response:
        assert response.status == 200
    # A message nobody owns is not cached either.
    assert await speak(client, body(message_id="m-404"), ALICE) == (200, "disabled")
    await settle(client.app)

    metadata = await message_metadata(postgres_dsn, "m-1")
    assert metadata is not None and metadata["kept"] == 1
    cached = metadata["tts_cache"]
    assert set(cached) == {"volume_path", "voice", "provider", "cached_at"}
    assert cached["voice"] == "af_nicole" and cached["volume_path"].endswith("af_nicole.mp3")
    assert [r["user_id"] for r in await rows(postgres_dsn)] == ["alice@example.com"]
    assert legacy_backend.calls[SPEAK] == 4  # Bob twice, Alice once, m-404 once


async def test_requests_are_answered_while_postgres_is_down(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    postgres_dsn: str,
    postgres_server: PostgresServer,
) -> None:
    await create_chat_messages(postgres_dsn, [ChatMessage("m-1", "alice@example.com", "t-1")])
    client = await proxy_with_index(
        aiohttp_client,
        legacy_backend,
        tmp_path,
        postgres_dsn,
        **{"index.verify_ownership": True, "index.ownership_cache_seconds": 0},
    )
    assert await speak(client, body(), ALICE) == (200, "miss")
    postgres_server.stop()
    try:
        # Ownership cannot be verified: fail closed, still answered by the upstream.
        for _ in range(2):
            assert await speak(client, body(), ALICE) == (200, "disabled")
    finally:
        postgres_server.start()
    for _ in range(100):
        if await client.app[INDEX].ping():
            break
        await asyncio.sleep(0.1)
    assert await speak(client, body(), ALICE) == (200, "hit")
    assert legacy_backend.calls[SPEAK] == 3


async def test_without_ownership_checks_a_dead_index_is_skipped(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    postgres_dsn: str,
    postgres_server: PostgresServer,
) -> None:
    client = await proxy_with_index(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    postgres_server.stop()
    try:
        assert await speak(client, body(), ALICE) == (200, "miss")
        assert await speak(client, body(), ALICE) == (200, "hit")
        await settle(client.app)
        assert client.app[CACHE].errors["index"] >= 1
    finally:
        postgres_server.start()
