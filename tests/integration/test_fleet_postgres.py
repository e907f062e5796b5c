"""Two proxies on one PostgreSQL and one Volume (two replicas, in one test process): what one
purges or records anew, the other drops; what PostgreSQL cannot carry, the answer says."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from proxy.app import create_app
from proxy.state import BROADCAST
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.pg import PostgresServer
from tests.support import SPEAK, TOKEN, settle, speak, speak_body

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def replica(aiohttp_client: Any, backend: FakeLegacyBackend, tmp_path: Path, dsn: str) -> Any:
    settings = settings_for(
        tmp_path,
        backend.url,
        **{"index.dsn": dsn, "index.timeout_seconds": 1.0, "admin.token": TOKEN},
    )
    return await aiohttp_client(create_app(settings))


async def purge(client: Any, **query: str) -> dict[str, Any]:
    async with client.delete("/_proxy/admin/api/entries", params=query, headers=ADMIN) as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def test_a_purge_on_one_replica_drops_the_others_copy_and_its_fill_in_flight(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    first = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    second = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert (await speak(first, SPEAK, speak_body())).cache == "miss"
    await settle(first.app)
    assert (await speak(second, SPEAK, speak_body())).tier == "volume"
    assert (await speak(second, SPEAK, speak_body())).tier == "memory"
    # Meanwhile the second replica synthesizes another of Alice's messages, slowly.
    legacy_backend.speak.chunk_delay = 0.1
    in_flight = asyncio.create_task(speak(second, SPEAK, speak_body(message_id="m-2")))
    for _ in range(300):
        if legacy_backend.calls[SPEAK] == 2:
            break
        await asyncio.sleep(0.01)

    answer = await purge(first, user="alice@example.com")

    assert answer["processes"]["confirmed"] == 2 and answer["processes"]["expected"] == 2
    assert (await in_flight).cache == "miss"  # its client still gets the audio...
    await settle(second.app)
    legacy_backend.speak.chunk_delay = 0.0
    calls = legacy_backend.calls[SPEAK]
    # ...but neither replica serves anything of Alice's any more: both are new syntheses.
    assert (await speak(second, SPEAK, speak_body())).cache == "miss"
    assert (await speak(first, SPEAK, speak_body(message_id="m-2"))).cache == "miss"
    assert legacy_backend.calls[SPEAK] == calls + 2


async def test_a_new_recording_on_one_replica_drops_the_others_older_copy(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    first = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    second = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert (await speak(first, SPEAK, speak_body())).cache == "miss"
    await settle(first.app)
    assert (await speak(second, SPEAK, speak_body())).tier == "volume"
    assert (await speak(second, SPEAK, speak_body())).tier == "memory"

    # The message is edited: the first replica records the new text over the old entry.
    notices = second.app[BROADCAST].local.applied["stored"]
    assert (await speak(first, SPEAK, speak_body(text="Hello again"))).cache == "miss"
    await settle(first.app)
    await notice_applied(second, notices)

    # The second replica no longer holds the replaced recording in memory: the old text is a
    # miss there (the Volume holds the new one), and the new text comes from the Volume.
    calls = legacy_backend.calls[SPEAK]
    assert (await speak(second, SPEAK, speak_body())).cache == "miss"
    assert legacy_backend.calls[SPEAK] == calls + 1
    notices = first.app[BROADCAST].local.applied["stored"]
    await settle(second.app)
    await notice_applied(first, notices)
    # ...and the second's recording replaced the first's in turn.
    assert (await speak(first, SPEAK, speak_body(text="Hello again"))).cache == "miss"


async def notice_applied(client: Any, before: int) -> None:
    """Wait until `client` applied one more stored notice (it travels through PostgreSQL)."""
    local = client.app[BROADCAST].local
    for _ in range(200):
        if local.applied["stored"] > before:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no stored notice arrived")


async def test_a_purge_while_postgres_is_down_says_the_other_replicas_were_not_told(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    postgres_dsn: str,
    postgres_server: PostgresServer,
) -> None:
    client = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert (await speak(client, SPEAK, speak_body())).cache == "miss"
    await settle(client.app)
    postgres_server.stop()
    try:
        answer = await purge(client, user="alice@example.com")
    finally:
        postgres_server.start()
    # What this process reaches is gone; what it cannot know, it does not claim.
    assert answer["memory"] == 1 and answer["volume"] == 1
    assert answer["processes"]["expected"] is None
    assert "other replicas" in answer["processes"]["note"]
    async with client.get("/_proxy/metrics") as response:
        assert "tts_proxy_purges_unconfirmed_total 1.0" in await response.text()


async def test_a_notification_that_is_not_an_invalidation_is_ignored(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    client = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    assert (await speak(client, SPEAK, speak_body())).cache == "miss"
    channel = client.app[BROADCAST].bus.channel
    connection = await asyncpg.connect(postgres_dsn)
    try:
        for payload in ('{"kind": "purge", "scope": {"all": "true"}}', "garbage"):
            await connection.execute("SELECT pg_notify($1, $2)", channel, payload)
    finally:
        await connection.close()
    await asyncio.sleep(0.2)
    assert (await speak(client, SPEAK, speak_body())).tier == "memory"
    assert client.app[BROADCAST].bus.errors["bad_message"] == 2
