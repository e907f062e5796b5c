"""Content keys through the real proxy: the legacy client's body without ids is cached per user.

The app's current client sends only `{"text", "provider", "voice"}`; these calls are keyed by
(user, sha256 of the text, voice, provider) when `tts.save_by_default` is on, or when the body
says `save_to_volume: true`.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path
from typing import Any

import asyncpg
from multidict import CIMultiDict

from proxy.app import create_app
from proxy.state import JANITOR
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, BOB, SPEAK, TOKEN, settle

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CLIENT_BODY = {"text": "Hello there", "provider": "replicate", "voice": "af_nicole"}


async def speak(
    client: Any, payload: dict[str, Any], headers: dict[str, str] = ALICE
) -> tuple[CIMultiDict[str], bytes]:
    async with client.post(SPEAK, json=payload, headers=headers) as response:
        assert response.status == 200
        return CIMultiDict(response.headers), await response.read()


async def proxy(
    aiohttp_client: Any, backend: FakeLegacyBackend, tmp_path: Path, **extra: Any
) -> Any:
    settings = settings_for(
        tmp_path, backend.url, **{"tts.save_by_default": True, "admin.token": TOKEN, **extra}
    )
    return await aiohttp_client(create_app(settings))


def objects(tmp_path: Path) -> list[str]:
    root = tmp_path / "volume" / "tts_audio"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.mp3")) if root.exists() else []


async def test_by_default_a_body_that_says_nothing_is_not_saved(
    make_proxy_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    client = await make_proxy_client()
    for _ in range(2):
        headers, audio = await speak(client, CLIENT_BODY)
        assert headers["X-TTS-Cache"] == "disabled"
        assert headers["Cache-Status"].endswith("detail=save-default-off")
        assert audio == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    # ... unless it asks: the legacy client's body with save_to_volume, but no ids.
    headers, _ = await speak(client, {**CLIENT_BODY, "save_to_volume": True})
    assert headers["X-TTS-Cache"] == "miss"
    assert legacy_backend.calls[SPEAK] == 3


async def test_the_legacy_clients_body_is_a_miss_then_a_hit_per_user(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    client = await proxy(aiohttp_client, legacy_backend, tmp_path)
    headers, audio = await speak(client, CLIENT_BODY)
    assert headers["X-TTS-Cache"] == "miss"
    assert audio == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    digest = hashlib.sha256(b"Hello there").hexdigest()
    location = headers["Content-Location"]
    assert location.startswith(f"/_proxy/audio/_text/{digest}/af_nicole.")
    assert headers["Cache-Control"].startswith("private")

    headers, again = await speak(client, CLIENT_BODY)
    assert headers["X-TTS-Cache"] == "hit" and again == audio
    assert headers["Content-Location"] == location
    assert legacy_backend.calls[SPEAK] == 1
    # Nothing of the cache's own reaches the backend.
    assert legacy_backend.speak_bodies == [CLIENT_BODY]

    # Another user: their own entry, from their own upstream call.
    headers, bobs = await speak(client, CLIENT_BODY, BOB)
    assert headers["X-TTS-Cache"] == "miss" and bobs == audio
    assert legacy_backend.calls[SPEAK] == 2
    # An edited text is another recording.
    edited = {**CLIENT_BODY, "text": "Hello there!"}
    headers, other = await speak(client, edited)
    assert headers["X-TTS-Cache"] == "miss"
    assert other == FakeLegacyBackend.audio_for("Hello there!", "af_nicole")
    assert (await speak(client, edited))[0]["X-TTS-Cache"] == "hit"
    # An explicit save_to_volume: false always wins, even over a stored entry.
    headers, _ = await speak(client, {**CLIENT_BODY, "save_to_volume": False})
    assert headers["X-TTS-Cache"] == "disabled"
    assert headers["Cache-Status"] == "tts-cache-proxy; fwd=bypass; detail=save-off"
    assert "Content-Location" not in headers
    assert legacy_backend.calls[SPEAK] == 4

    await settle(client.app)
    stored = objects(tmp_path)
    assert len(stored) == 3
    assert any(name.startswith(f"alice@example.com/_text/{digest}/af_nicole.") for name in stored)
    assert any(name.startswith(f"bob@example.com/_text/{digest}/") for name in stored)

    # The audio URL serves the entry to its user, with ranges, and to nobody else.
    async with client.get(location, headers=ALICE) as response:
        assert response.status == 200 and await response.read() == audio
    async with client.get(location, headers={**ALICE, "Range": "bytes=0-9"}) as response:
        assert response.status == 206 and await response.read() == audio[:10]
    async with client.get(location, headers={"X-Forwarded-Email": "carol@example.com"}) as r:
        assert r.status == 404


async def test_content_entries_survive_a_restart_and_go_with_their_user(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    first = await proxy(aiohttp_client, legacy_backend, tmp_path)
    assert (await speak(first, CLIENT_BODY))[0]["X-TTS-Cache"] == "miss"
    message = {**CLIENT_BODY, "message_id": "m-1", "thread_id": "t-1", "save_to_volume": True}
    assert (await speak(first, message))[0]["X-TTS-Cache"] == "miss"
    assert (await speak(first, CLIENT_BODY, BOB))[0]["X-TTS-Cache"] == "miss"
    await settle(first.app)

    second = await proxy(aiohttp_client, legacy_backend, tmp_path)
    headers, _ = await speak(second, CLIENT_BODY)
    assert headers["X-TTS-Cache"] == "hit" and headers["X-TTS-Cache-Tier"] == "volume"
    async with second.delete(
        "/_proxy/admin/api/entries", params={"user": "alice@example.com"}, headers=ADMIN
    ) as response:
        assert response.status == 200
        assert (await response.json())["volume"] == 2  # her content entry and her message's
    assert [name.split("/")[0] for name in objects(tmp_path)] == ["bob@example.com"]
    calls = legacy_backend.calls[SPEAK]
    assert (await speak(second, CLIENT_BODY))[0]["X-TTS-Cache"] == "miss"
    assert legacy_backend.calls[SPEAK] == calls + 1


async def test_the_shared_scope_shares_and_the_user_scope_does_not(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    shared = await proxy(
        aiohttp_client,
        legacy_backend,
        tmp_path,
        **{"tts.routes": [{"path": SPEAK, "contract": "legacy", "scope": "shared"}]},
    )
    headers, audio = await speak(shared, CLIENT_BODY)
    assert headers["X-TTS-Cache"] == "miss"
    location = headers["Content-Location"]
    assert location.startswith("/_proxy/audio/_shared/")
    headers, bobs = await speak(shared, CLIENT_BODY, BOB)
    assert headers["X-TTS-Cache"] == "hit" and bobs == audio
    assert legacy_backend.calls[SPEAK] == 1
    async with shared.get(location, headers=BOB) as response:
        assert response.status == 200 and await response.read() == audio
    async with shared.get(location) as response:  # no identity: nothing, shared or not
        assert response.status == 404
    # Messages stay per user in a shared route: a message is private by nature.
    message = {**CLIENT_BODY, "message_id": "m-1", "thread_id": "t-1", "save_to_volume": True}
    assert (await speak(shared, message))[0]["X-TTS-Cache"] == "miss"
    assert (await speak(shared, message, BOB))[0]["X-TTS-Cache"] == "miss"
    await settle(shared.app)
    assert [name.split("/")[0] for name in objects(tmp_path)] == [
        "_shared",
        "alice@example.com",
        "bob@example.com",
    ]

    per_user = await proxy(aiohttp_client, legacy_backend, tmp_path / "other")
    assert (await speak(per_user, CLIENT_BODY))[0]["X-TTS-Cache"] == "miss"
    assert (await speak(per_user, CLIENT_BODY, BOB))[0]["X-TTS-Cache"] == "miss"


async def test_content_entries_are_indexed_and_need_no_message_owner(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    client = await proxy(
        aiohttp_client,
        legacy_backend,
        tmp_path,
        **{
            "index.dsn": postgres_dsn,
            "index.verify_ownership": True,
            "index.write_legacy_metadata": True,
        },
    )
    # No chat_messages row names this call: a content key is its user's by construction.
    assert (await speak(client, CLIENT_BODY))[0]["X-TTS-Cache"] == "miss"
    assert (await speak(client, CLIENT_BODY))[0]["X-TTS-Cache"] == "hit"
    await settle(client.app)
    connection = await asyncpg.connect(postgres_dsn)
    try:
        rows = await connection.fetch(
            "SELECT user_id, thread_id, message_id FROM tts_cache.tts_cache_entries"
        )
    finally:
        await connection.close()
    digest = hashlib.sha256(b"Hello there").hexdigest()
    assert [tuple(row) for row in rows] == [("alice@example.com", "_text", digest)]


async def test_the_dashboard_lists_plays_and_purges_content_entries(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    client = await proxy(aiohttp_client, legacy_backend, tmp_path)
    _, audio = await speak(client, CLIENT_BODY)
    message = {**CLIENT_BODY, "message_id": "m-1", "thread_id": "t-1", "save_to_volume": True}
    await speak(client, message)
    await settle(client.app)
    digest = hashlib.sha256(b"Hello there").hexdigest()
    async with client.post(
        "/_proxy/admin/login", data={"token": TOKEN}, allow_redirects=False
    ) as response:
        assert response.status == 303
    async with client.get("/_proxy/admin/entries") as response:
        page = await response.text()
    # A content entry shows "text" and a short digest where a message shows its ids.
    assert f"<code>{digest[:12]}…</code>" in page and ">text</span>" in page
    assert ">t-1</a>" in page and ">m-1</td>" in page
    found = re.search(r'href="(/_proxy/admin/entry\?[^"]*thread=_text[^"]*)"', page)
    assert found is not None
    async with client.get(html.unescape(found.group(1))) as response:
        entry = await response.text()
        assert response.status == 200 and digest in entry
    player = re.search(r'<audio [^>]*src="([^"]+)"', entry)
    assert player is not None
    async with client.get(html.unescape(player.group(1))) as response:
        assert response.status == 200 and await response.read() == audio
    # Purging the user (the entries page's own link) takes her text entries too.
    async with client.get("/_proxy/admin/purge?user=alice@example.com") as response:
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', await response.text())
    assert csrf is not None
    async with client.post(
        "/_proxy/admin/purge",
        data={"csrf": csrf.group(1), "user": "alice@example.com"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303 and "removed=2" in response.headers["Location"]
    assert objects(tmp_path) == []


async def test_the_janitor_counts_text_entries_against_their_users_quota(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    # Room for one 64 KiB recording per user: Alice's oldest text entry goes, Bob's stays.
    client = await proxy(
        aiohttp_client, legacy_backend, tmp_path, **{"cache.volume.user_max_bytes": 100_000}
    )
    await speak(client, CLIENT_BODY)
    await speak(client, CLIENT_BODY, BOB)
    await settle(client.app)
    await speak(client, {**CLIENT_BODY, "text": "A second text"})
    await settle(client.app)
    report = await client.app[JANITOR].run_once()
    assert report.evicted_quota == 1
    digest = hashlib.sha256(b"A second text").hexdigest()
    kept = objects(tmp_path)
    assert len(kept) == 2 and any(f"alice@example.com/_text/{digest}/" in k for k in kept)
