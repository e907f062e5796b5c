"""The two-tier cache through the real proxy, in front of the fake legacy backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from proxy.app import create_app
from proxy.config import Settings
from proxy.state import CACHE
from tests.conftest import settings_for
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.support import ALICE, BOB, SPEAK, TOKEN, settle, speak_body


def body(**change: Any) -> dict[str, Any]:
    """A cacheable speak body, as the Flutter client sends it."""
    return speak_body(**{"provider": "replicate", **change})


async def speak(
    client: TestClient[Any, Any], payload: dict[str, Any], headers: dict[str, str] = ALICE
) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.post(SPEAK, json=payload, headers=headers) as response:
        data = await response.read()
        return response.status, CIMultiDict(response.headers), data


async def start(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return client


def volume_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "volume"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def wait_for_volume(client: TestClient[Any, Any]) -> None:
    await settle(client.app)


async def test_miss_then_hit_from_memory(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    status, headers, audio = await speak(proxy_client, body())
    assert status == 200
    assert headers["X-TTS-Cache"] == "miss"
    assert headers["Cache-Status"] == "tts-cache-proxy; fwd=uri-miss; stored"
    assert headers["Content-Location"] == "/_proxy/audio/t-1/m-1/af_nicole"
    assert headers.getall("Via") == ["1.1 tts-cache-proxy"]
    assert audio == FakeLegacyBackend.audio_for("Hello there", "af_nicole")

    status, headers, again = await speak(proxy_client, body())
    assert status == 200 and again == audio
    assert headers.getall("Via") == ["1.1 tts-cache-proxy"]
    assert headers["X-TTS-Cache"] == "hit"
    assert headers["X-TTS-Cache-Tier"] == "memory"
    assert headers["Cache-Status"] == "tts-cache-proxy; hit; detail=memory"
    assert headers["Content-Type"] == "audio/mpeg"
    assert headers["X-TTS-Provider"] == "replicate"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Content-Length"] == str(len(audio))
    assert headers["ETag"].startswith('"') and int(headers["Age"]) >= 0
    assert legacy_backend.calls[SPEAK] == 1
    # save_to_volume is not forwarded: the backend must not cache a second time.
    assert "save_to_volume" not in legacy_backend.speak_bodies[0]
    assert legacy_backend.speak_bodies[0]["message_id"] == "m-1"


async def test_hit_from_the_volume_after_a_restart(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url)
    first = await start(aiohttp_client, settings)
    _, _, audio = await speak(first, body())
    await wait_for_volume(first)
    await first.close()
    assert any(p.suffix == ".mp3" for p in volume_files(tmp_path))

    second = await start(aiohttp_client, settings)
    status, headers, again = await speak(second, body())
    assert (status, again) == (200, audio)
    assert headers["X-TTS-Cache"] == "hit" and headers["X-TTS-Cache-Tier"] == "volume"
    _, headers, _ = await speak(second, body())
    assert headers["X-TTS-Cache-Tier"] == "memory"
    assert legacy_backend.calls[SPEAK] == 1


async def test_edited_text_is_synthesized_again_and_replaces_the_entry(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    await speak(proxy_client, body())
    _, headers, audio = await speak(proxy_client, body(text="Hello, edited"))
    assert headers["X-TTS-Cache"] == "miss"
    assert audio == FakeLegacyBackend.audio_for("Hello, edited", "af_nicole")
    _, headers, again = await speak(proxy_client, body(text="Hello, edited"))
    assert headers["X-TTS-Cache"] == "hit" and again == audio
    assert legacy_backend.calls[SPEAK] == 2


async def test_another_voice_and_another_user_are_separate_entries(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    await speak(proxy_client, body())
    _, headers, audio = await speak(proxy_client, body(voice="af_bella"))
    assert headers["X-TTS-Cache"] == "miss"
    assert audio == FakeLegacyBackend.audio_for("Hello there", "af_bella")
    _, headers, _ = await speak(proxy_client, body(), headers=BOB)
    assert headers["X-TTS-Cache"] == "miss"
    assert legacy_backend.calls[SPEAK] == 3


async def test_fifty_concurrent_misses_make_one_upstream_call(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.chunk_delay = 0.02
    results = await asyncio.gather(*(speak(proxy_client, body()) for _ in range(50)))
    assert legacy_backend.calls[SPEAK] == 1
    expected = FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    assert all(status == 200 and data == expected for status, _, data in results)
    statuses = [headers["Cache-Status"] for _, headers, _ in results]
    assert sum("collapsed" in s for s in statuses) == 49
    assert all(headers["X-TTS-Cache"] == "miss" for _, headers, _ in results)
    _, headers, _ = await speak(proxy_client, body())
    assert headers["X-TTS-Cache"] == "hit"


async def test_requests_joining_a_fill_in_flight_do_not_read_the_volume(
    proxy_client: TestClient[Any, Any],
    legacy_backend: FakeLegacyBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    legacy_backend.speak.headers_delay = 0.3
    volume = proxy_client.server.app[CACHE].volume
    assert volume is not None
    lookups: list[object] = []
    read = volume.get

    async def counted(key: Any) -> Any:
        lookups.append(key)
        return await read(key)

    monkeypatch.setattr(volume, "get", counted)
    first = asyncio.create_task(speak(proxy_client, body()))
    await asyncio.sleep(0.1)
    # The fill is in flight, its head not back yet.
    assert legacy_backend.calls[SPEAK] == 1 and len(lookups) == 1 and not first.done()
    joined = await asyncio.gather(*(speak(proxy_client, body()) for _ in range(10)))
    status, headers, data = await first
    assert status == 200 and headers["X-TTS-Cache"] == "miss"
    assert all(s == 200 and d == data and "collapsed" in h["Cache-Status"] for s, h, d in joined)
    assert len(lookups) == 1 and legacy_backend.calls[SPEAK] == 1


async def test_first_client_aborting_does_not_stop_the_others(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.chunk_delay = 0.05
    url = proxy_client.make_url(SPEAK)
    async with aiohttp.ClientSession() as session:
        first = await session.post(url, json=body(), headers=ALICE)
        assert first.status == 200
        await first.content.readany()
        joined = asyncio.create_task(speak(proxy_client, body()))
        await asyncio.sleep(0.05)
        first.close()  # the first client goes away mid-stream
        status, headers, data = await joined
    assert status == 200 and "collapsed" in headers["Cache-Status"]
    assert data == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    _, headers, again = await speak(proxy_client, body())
    assert headers["X-TTS-Cache"] == "hit" and again == data
    assert legacy_backend.calls[SPEAK] == 1


@pytest.mark.parametrize(
    ("behaviour", "client_sees"),
    [
        ({"status": 500}, 500),
        ({"status": 503}, 503),
        ({"content_type": "application/json"}, 200),
        ({"provider": "deepgram"}, 200),
    ],
)
async def test_bad_responses_are_passed_on_and_never_stored(
    proxy_client: TestClient[Any, Any],
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    behaviour: dict[str, Any],
    client_sees: int,
) -> None:
    for name, value in behaviour.items():
        setattr(legacy_backend.speak, name, value)
    for _ in range(2):
        status, headers, _ = await speak(proxy_client, body())
        assert status == client_sees
        assert headers["X-TTS-Cache"] == "miss"
        assert "stored" not in headers["Cache-Status"]
    assert legacy_backend.calls[SPEAK] == 2
    await wait_for_volume(proxy_client)
    assert volume_files(tmp_path) == []


async def test_truncated_upstream_body_is_not_stored_and_not_passed_as_complete(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    legacy_backend.speak.truncate = True
    for _ in range(2):
        with pytest.raises(aiohttp.ClientPayloadError):
            await speak(proxy_client, body())
    assert legacy_backend.calls[SPEAK] == 2
    await wait_for_volume(proxy_client)
    assert volume_files(tmp_path) == []


async def test_chunked_upstream_is_stored_when_complete(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.chunked = True
    _, headers, audio = await speak(proxy_client, body())
    assert headers["X-TTS-Cache"] == "miss"
    _, headers, again = await speak(proxy_client, body())
    assert headers["X-TTS-Cache"] == "hit" and again == audio
    assert headers["Content-Length"] == str(len(audio))


async def test_corrupt_volume_file_is_a_miss_and_is_replaced(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"admin.token": TOKEN})
    first = await start(aiohttp_client, settings)
    _, _, audio = await speak(first, body())
    await wait_for_volume(first)
    await first.close()
    (obj,) = [p for p in volume_files(tmp_path) if p.suffix == ".mp3"]
    damaged = bytearray(obj.read_bytes())
    for index in range(100, 201):
        damaged[index] ^= 0xFF
    obj.write_bytes(bytes(damaged))

    second = await start(aiohttp_client, settings)
    status, headers, again = await speak(second, body())
    assert status == 200 and headers["X-TTS-Cache"] == "miss" and again == audio
    assert legacy_backend.calls[SPEAK] == 2
    await wait_for_volume(second)
    assert obj.read_bytes() == audio
    # Counted as corruption, not as a Volume failure: the Volume answered.
    async with second.get("/_proxy/metrics") as response:
        metrics = await response.text()
    assert 'tts_proxy_errors_total{kind="volume_corrupt"} 1.0' in metrics
    assert 'tts_proxy_errors_total{kind="volume"} 0.0' in metrics
    async with second.post("/_proxy/admin/login", data={"token": TOKEN}) as response:
        overview = await response.text()  # the login redirects to the overview
    assert '<td id="errors-volume_corrupt" class="bad">1</td>' in overview


async def test_a_failing_volume_never_fails_a_request(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    # Root ignores permission bits, so the Volume is broken by putting a file where a folder goes.
    (tmp_path / "volume").write_bytes(b"not a folder")
    client = await start(aiohttp_client, settings_for(tmp_path, legacy_backend.url))
    for _ in range(3):
        status, _, audio = await speak(client, body())
        assert status == 200
        assert audio == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    await wait_for_volume(client)
    cache = client.app[CACHE]
    assert cache.errors["volume"] >= 1
    assert legacy_backend.calls[SPEAK] == 1  # memory still serves


async def test_identity_from_an_untrusted_peer_is_ignored_and_dropped(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path, legacy_backend.url, **{"identity.trusted_proxies": ["10.0.0.0/8"]}
    )
    client = await start(aiohttp_client, settings)
    spoofed = {**ALICE, "X-Forwarded-Access-Token": "stolen"}
    for _ in range(2):
        status, headers, _ = await speak(client, body(), headers=spoofed)
        assert status == 200 and headers["X-TTS-Cache"] == "disabled"
        assert headers["Cache-Status"] == "tts-cache-proxy; fwd=bypass; detail=untrusted-peer"
    assert legacy_backend.calls[SPEAK] == 2
    for seen in legacy_backend.speak_headers:
        assert "X-Forwarded-Email" not in seen and "X-Forwarded-Access-Token" not in seen
    # Not cacheable: forwarded untouched, save_to_volume included.
    assert legacy_backend.speak_bodies[0]["save_to_volume"] is True
    assert volume_files(tmp_path) == []


@pytest.mark.parametrize(
    "change",
    [
        {"message_id": "../x"},
        {"thread_id": "../../etc"},
        {"message_id": "m" * 5000},
        {"voice": "af\x00nicole"},
        {"message_id": "méssage"},
        {"thread_id": "a/b"},
        {"voice": ".."},
    ],
)
async def test_hostile_ids_never_touch_a_path(
    proxy_client: TestClient[Any, Any],
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    change: dict[str, Any],
) -> None:
    status, headers, _ = await speak(proxy_client, body(**change))
    assert status == 200 and headers["X-TTS-Cache"] == "disabled"
    await wait_for_volume(proxy_client)
    assert volume_files(tmp_path) == []


async def test_hostile_user_is_not_cacheable(
    proxy_client: TestClient[Any, Any], tmp_path: Path
) -> None:
    for user in ("../../root", "a/b", "x" * 300):
        _, headers, _ = await speak(proxy_client, body(), headers={"X-Forwarded-Email": user})
        assert headers["X-TTS-Cache"] == "disabled"
    assert volume_files(tmp_path) == []


async def test_not_cacheable_requests_are_forwarded_disabled(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    cases: list[tuple[dict[str, Any], dict[str, str]]] = [
        (body(save_to_volume=False), ALICE),
        (body(message_id=None), ALICE),
        (body(), {}),
    ]
    for payload, headers in cases:
        status, seen, _ = await speak(proxy_client, payload, headers)
        assert status == 200 and seen["X-TTS-Cache"] == "disabled"
        assert "Content-Location" not in seen
    assert legacy_backend.calls[SPEAK] == 3


async def test_malformed_json_is_forwarded_untouched(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    raw = b'{"text": "unterminated'
    async with proxy_client.post(SPEAK, data=raw, headers=ALICE) as response:
        assert response.headers["X-TTS-Cache"] == "disabled"
        status = response.status
    assert status == legacy_backend_status_for_malformed()
    assert legacy_backend.calls[SPEAK] == 1


def legacy_backend_status_for_malformed() -> int:
    """The fake answers malformed JSON as FastAPI does."""
    return 422


async def test_oversize_body_is_refused_with_413(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"tts.max_body_bytes": 1024})
    client = await start(aiohttp_client, settings)
    status, _, data = await speak(client, body(text="x" * 2000))
    assert status == 413 and "detail" in json.loads(data)
    assert legacy_backend.calls[SPEAK] == 0
    status, headers, _ = await speak(client, body())
    assert status == 200 and headers["X-TTS-Cache"] == "miss"


async def test_identity_mode_none_is_pure_pass_through(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"identity.mode": "none"})
    client = await start(aiohttp_client, settings)
    for _ in range(2):
        _, headers, _ = await speak(client, body())
        assert headers["X-TTS-Cache"] == "disabled"
    assert legacy_backend.calls[SPEAK] == 2
    assert legacy_backend.speak_bodies[0]["save_to_volume"] is True


async def test_get_on_a_speak_path_is_passed_through(
    proxy_client: TestClient[Any, Any], legacy_backend: FakeLegacyBackend
) -> None:
    async with proxy_client.get(SPEAK) as response:
        assert response.status == 405  # the backend's answer, not the proxy's
    assert legacy_backend.calls[SPEAK] == 1


async def test_audio_url_range_etag_head_and_ownership(
    proxy_client: TestClient[Any, Any],
) -> None:
    _, headers, audio = await speak(proxy_client, body())
    url = headers["Content-Location"]

    async with proxy_client.get(url, headers=ALICE) as response:
        assert response.status == 200 and await response.read() == audio
        assert response.headers["Accept-Ranges"] == "bytes"
        etag = response.headers["ETag"]
    async with proxy_client.get(url, headers={**ALICE, "Range": "bytes=10-19"}) as response:
        assert response.status == 206 and await response.read() == audio[10:20]
        assert response.headers["Content-Range"] == f"bytes 10-19/{len(audio)}"
    async with proxy_client.get(url, headers={**ALICE, "Range": "bytes=-100"}) as response:
        assert response.status == 206 and await response.read() == audio[-100:]
    async with proxy_client.get(url, headers={**ALICE, "Range": "bytes=999999-"}) as response:
        assert response.status == 416
        assert response.headers["Content-Range"] == f"bytes */{len(audio)}"
    async with proxy_client.get(url, headers={**ALICE, "If-None-Match": etag}) as response:
        assert response.status == 304 and await response.read() == b""
    stale = {**ALICE, "Range": "bytes=0-9", "If-Range": '"other"'}
    async with proxy_client.get(url, headers=stale) as response:
        assert response.status == 200 and await response.read() == audio
    async with proxy_client.head(url, headers=ALICE) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(audio))
        assert await response.read() == b""
    for other in (BOB, {}):
        async with proxy_client.get(url, headers=other) as response:
            assert response.status == 404
    async with proxy_client.get("/_proxy/audio/t-1/m-404/af_nicole", headers=ALICE) as response:
        assert response.status == 404


async def test_memory_bound_holds_after_a_burst_of_distinct_keys(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    limit = 300_000
    settings = settings_for(
        tmp_path,
        legacy_backend.url,
        **{"cache.memory.max_bytes": limit, "cache.volume.kind": "none"},
    )
    client = await start(aiohttp_client, settings)
    await asyncio.gather(*(speak(client, body(message_id=f"m-{i}")) for i in range(40)))
    memory = client.app[CACHE].memory
    assert memory is not None
    assert 0 < memory.current_bytes <= limit
    assert memory.entry_count < 40


def test_fake_audio_differs_per_text_and_voice() -> None:
    a = FakeLegacyBackend.audio_for("x", "v1")
    assert a != FakeLegacyBackend.audio_for("y", "v1") != FakeLegacyBackend.audio_for("x", "v2")
    assert (
        hashlib.sha256(a).hexdigest()
        == hashlib.sha256(FakeLegacyBackend.audio_for("x", "v1")).hexdigest()
    )


def test_tests_keep_disk_state_out_of_the_tree() -> None:
    assert not os.path.exists(Path(__file__).parents[2] / "var" / "volume" / "tts_audio" / "t")


async def test_header_identity_mode_uses_the_named_header(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path,
        legacy_backend.url,
        **{"identity.mode": "header", "identity.user_header": "X-Auth-User"},
    )
    client = await start(aiohttp_client, settings)
    _, headers, _ = await speak(client, body(), headers={"X-Auth-User": "dana"})
    assert headers["X-TTS-Cache"] == "miss"
    _, headers, _ = await speak(client, body(), headers={"X-Auth-User": "dana"})
    assert headers["X-TTS-Cache"] == "hit"
    _, headers, _ = await speak(client, body(), headers=ALICE)  # not the configured header
    assert headers["X-TTS-Cache"] == "disabled"


async def test_a_failed_miss_names_no_audio_location(
    aiohttp_client: Any, tmp_path: Path, legacy_backend: FakeLegacyBackend
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{probe.getsockname()[1]}"
    client = await start(aiohttp_client, settings_for(tmp_path, nowhere))

    status, headers, _ = await speak(client, body())

    assert status == 502
    assert headers["X-TTS-Cache"] == "miss"
    assert "Content-Location" not in headers  # nothing was stored there
    await wait_for_volume(client)
    assert volume_files(tmp_path) == []
