"""The admin API (purge, stats) and admission rules, through the real proxy."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.state import JANITOR
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, BOB, SPEAK, TOKEN, settle
from tests.support import speak_body as body

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def outcome(client: Any, payload: dict[str, Any], headers: dict[str, str] = ALICE) -> str:
    async with client.post(SPEAK, json=payload, headers=headers) as response:
        await response.read()
        assert response.status == 200
        return str(response.headers["X-TTS-Cache"])


@pytest.fixture
async def admin_client(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> Any:
    settings = settings_for(tmp_path, legacy_backend.url, **{"admin.token": TOKEN})
    return await aiohttp_client(create_app(settings))


async def fill_cache(client: Any) -> None:
    """Alice: t-1/m-1 in two voices, t-1/m-2, t-2/m-3; Bob: t-1/m-1."""
    for payload, who in [
        (body(), ALICE),
        (body(voice="af_bella"), ALICE),
        (body(message_id="m-2"), ALICE),
        (body(thread_id="t-2", message_id="m-3"), ALICE),
        (body(), BOB),
    ]:
        assert await outcome(client, payload, who) == "miss"
    await settle(client.app)


def volume_objects(tmp_path: Path) -> set[str]:
    root = tmp_path / "volume" / "tts_audio"
    return {str(p.relative_to(root)) for p in root.rglob("*.mp3")} if root.exists() else set()


@pytest.mark.parametrize(
    ("query", "removed", "still_cached"),
    [
        (
            {"user": "alice@example.com", "thread": "t-1", "message": "m-1", "voice": "af_bella"},
            1,
            ["alice@example.com/t-1/m-1/af_nicole.mp3"],
        ),
        (
            {"user": "alice@example.com", "thread": "t-1", "message": "m-1"},
            2,
            ["alice@example.com/t-1/m-2/af_nicole.mp3"],
        ),
        (
            {"user": "alice@example.com", "thread": "t-1"},
            3,
            ["alice@example.com/t-2/m-3/af_nicole.mp3"],
        ),
        ({"user": "alice@example.com"}, 4, ["bob@example.com/t-1/m-1/af_nicole.mp3"]),
        ({"all": "true"}, 5, []),
    ],
)
async def test_purge_each_scope(
    admin_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    query: dict[str, str],
    removed: int,
    still_cached: list[str],
) -> None:
    await fill_cache(admin_client)
    async with admin_client.delete(
        "/_proxy/admin/api/entries", params=query, headers=ADMIN
    ) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["removed"] == removed
    assert answer["volume"] == removed and answer["memory"] == removed
    remaining = volume_objects(tmp_path)
    for kept in still_cached:
        assert kept in remaining
    assert len(remaining) == 5 - removed
    # What was purged is never served again: the next request is a miss.
    calls = legacy_backend.calls[SPEAK]
    purged_voice = query.get("voice", "af_nicole")
    if "user" in query:
        assert await outcome(admin_client, body(voice=purged_voice)) == "miss"
        assert legacy_backend.calls[SPEAK] == calls + 1
    else:
        assert await outcome(admin_client, body(), BOB) == "miss"


async def test_purge_during_an_in_flight_fill_is_not_stored(
    admin_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    legacy_backend.speak.chunk_delay = 0.1
    pending = asyncio.create_task(outcome(admin_client, body()))
    await asyncio.sleep(0.2)
    async with admin_client.delete(
        "/_proxy/admin/api/entries", params={"user": "alice@example.com"}, headers=ADMIN
    ) as response:
        assert response.status == 200
        assert (await response.json())["fills_cancelled"] == 1
    assert await pending == "miss"  # the client in flight still gets its audio
    await settle(admin_client.app)
    assert volume_objects(tmp_path) == set()
    legacy_backend.speak.chunk_delay = 0.0
    assert await outcome(admin_client, body()) == "miss"
    assert legacy_backend.calls[SPEAK] == 2


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": f"Bearer {TOKEN}x"}, 401),
        (ADMIN, 200),
    ],
)
async def test_admin_api_needs_the_token(
    admin_client: Any, headers: dict[str, str], status: int
) -> None:
    async with admin_client.get("/_proxy/admin/api/stats", headers=headers) as response:
        assert response.status == status
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer"
    async with admin_client.delete(
        "/_proxy/admin/api/entries", params={"all": "true"}, headers=headers
    ) as response:
        assert response.status == status


async def test_admin_api_is_off_without_a_token(proxy_client: Any) -> None:
    for method, path in [("GET", "stats"), ("DELETE", "entries?all=true")]:
        async with proxy_client.request(
            method, f"/_proxy/admin/api/{path}", headers={"Authorization": "Bearer "}
        ) as response:
            assert response.status == 404
            assert "admin.token" in (await response.json())["detail"]


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"thread": "t-1"},
        {"user": "alice@example.com", "message": "m-1"},
        {"user": "../etc"},
        {"all": "true", "user": "alice@example.com"},
    ],
)
async def test_bad_purge_scopes_are_refused(admin_client: Any, query: dict[str, str]) -> None:
    async with admin_client.delete(
        "/_proxy/admin/api/entries", params=query, headers=ADMIN
    ) as response:
        assert response.status == 400
        assert "detail" in await response.json()


async def test_stats_after_a_known_sequence(admin_client: Any) -> None:
    await fill_cache(admin_client)  # 5 misses
    assert await outcome(admin_client, body()) == "hit"
    assert await outcome(admin_client, body(save_to_volume=False)) == "disabled"
    async with admin_client.get("/_proxy/admin/api/stats", headers=ADMIN) as response:
        stats = await response.json()
    assert stats["requests"]["misses"] == 5
    assert stats["requests"]["hits"] == {"memory": 1}
    assert stats["requests"]["disabled"] == 1
    assert stats["requests"]["stored"] == 5
    assert stats["tiers"]["memory"]["entries"] == 5
    assert stats["tiers"]["memory"]["bytes"] >= 5 * 65536


async def test_long_texts_bypass_the_cache(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"cache.max_text_chars": 20})
    client = await aiohttp_client(create_app(settings))
    assert await outcome(client, body(text="short")) == "miss"
    long_text = "a very long reply " * 5
    assert await outcome(client, body(text=long_text, message_id="m-2")) == "disabled"
    assert await outcome(client, body(text=long_text, message_id="m-2")) == "disabled"


async def test_min_uses_stores_on_the_nth_request(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"cache.min_uses": 2})
    client = await aiohttp_client(create_app(settings))
    async with client.post(SPEAK, json=body(), headers=ALICE) as response:
        await response.read()
        assert response.headers["X-TTS-Cache"] == "miss"
        assert "stored" not in response.headers["Cache-Status"]
    await settle(client.app)
    assert volume_objects(tmp_path) == set()
    assert await outcome(client, body()) == "miss"
    assert await outcome(client, body()) == "hit"
    assert legacy_backend.calls[SPEAK] == 2


async def test_purge_from_the_command_line_without_a_running_proxy(
    admin_client: Any, tmp_path: Path, legacy_backend: FakeLegacyBackend
) -> None:
    await fill_cache(admin_client)
    config = tmp_path / "purge.toml"
    config.write_text(f'[cache.volume]\npath = "{tmp_path / "volume"}"\n[server]\nport = 1\n')
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "purge",
        "--config",
        str(config),
        "--user",
        "alice@example.com",
        "--thread",
        "t-1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert '"removed": 3' in out.decode() and '"via": "direct"' in out.decode()
    assert time.monotonic() - started < 30
    assert volume_objects(tmp_path) == {
        "alice@example.com/t-2/m-3/af_nicole.mp3",
        "bob@example.com/t-1/m-1/af_nicole.mp3",
    }


async def test_a_full_disk_pauses_admission_and_requests_still_succeed(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    # No disk here has an exabyte free: the real statvfs says "below the minimum".
    settings = settings_for(
        tmp_path,
        legacy_backend.url,
        **{"cache.volume.min_free_bytes": 2**60, "admin.token": TOKEN},
    )
    client = await aiohttp_client(create_app(settings))
    for _ in range(2):
        async with client.post(SPEAK, json=body(), headers=ALICE) as response:
            assert response.status == 200 and len(await response.read()) == 65536
            assert response.headers["X-TTS-Cache"] == "miss"
            assert "stored" not in response.headers["Cache-Status"]
    await settle(client.app)
    assert volume_objects(tmp_path) == set()
    async with client.get("/_proxy/admin/api/stats", headers=ADMIN) as response:
        stats = await response.json()
    assert stats["errors"]["disk_full"] == 2
    assert stats["disk"]["admitting"] is False


async def test_stats_without_an_index_come_from_a_scan_and_the_janitors_walk(
    admin_client: Any,
) -> None:
    await fill_cache(admin_client)
    await admin_client.app[JANITOR].run_once()
    async with admin_client.get("/_proxy/admin/api/stats", headers=ADMIN) as response:
        stats = await response.json()
    # Totals from a listing seconds old; the walk's per-user figures for the top users.
    assert stats["tiers"]["volume"] == {"entries": 5, "bytes": 5 * 65536, "source": "scan"}
    assert stats["top_users"][0] == {
        "user": "alice@example.com",
        "entries": 4,
        "bytes": 4 * 65536,
    }
    assert stats["janitor"]["runs"] >= 1
