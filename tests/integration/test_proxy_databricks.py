"""The proxy with its Volume on the Files API emulator, authenticated by the real databricks-sdk."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.config import Settings
from proxy.state import VOLUME
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.fakes.files_api import FilesApiEmulator
from tests.support import ALICE, SPEAK, settle
from tests.support import speak_body as body

VOLUME_PATH = "/Volumes/main/default/tts"
APP_TOKEN = "dapi-app-token"
OBJECT = f"{VOLUME_PATH}/tts_audio/alice@example.com/t-1/m-1/af_nicole.mp3"


@pytest.fixture(autouse=True)
def databricks_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Only what the test sets reaches the SDK: no ~/.databrickscfg, no ambient variables."""
    for name in list(os.environ):
        if name.startswith(("DATABRICKS_", "ARM_", "AZURE_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    yield


@pytest.fixture
async def emulator(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FilesApiEmulator]:
    """The Files API emulator, with the app's PAT in the environment as Databricks Apps would."""
    server = FilesApiEmulator(volumes=[VOLUME_PATH], tokens=[APP_TOKEN], chunk_size=8 * 1024)
    await server.start()
    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", APP_TOKEN)
    try:
        yield server
    finally:
        await server.stop()


def databricks_settings(tmp_path: Path, backend: FakeLegacyBackend, **extra: Any) -> Settings:
    return settings_for(
        tmp_path,
        backend.url,
        **{
            "cache.volume.kind": "databricks",
            "cache.volume.path": VOLUME_PATH,
            "cache.volume.timeout_seconds": 1.0,
            "upstream.timeout_seconds": 5.0,
            **extra,
        },
    )


async def speak(
    client: Any, payload: dict[str, Any], headers: dict[str, str] = ALICE
) -> tuple[int, Any, bytes]:
    async with client.post(SPEAK, json=payload, headers=headers) as response:
        return response.status, response.headers.copy(), await response.read()


async def test_store_then_hit_from_the_volume_after_a_restart(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend)
    first = await aiohttp_client(create_app(settings))
    _, headers, audio = await speak(first, body())
    assert headers["X-TTS-Cache"] == "miss"
    await settle(first.app)
    await first.close()
    assert emulator.read(OBJECT) == audio
    assert emulator.read(OBJECT.replace(".mp3", ".meta.json")) is not None

    second = await aiohttp_client(create_app(settings))
    status, headers, again = await speak(second, body())
    assert (status, again) == (200, audio)
    assert headers["X-TTS-Cache"] == "hit" and headers["X-TTS-Cache-Tier"] == "volume"
    _, headers, _ = await speak(second, body())
    assert headers["X-TTS-Cache-Tier"] == "memory"
    async with second.get(
        "/_proxy/audio/t-1/m-1/af_nicole", headers={**ALICE, "Range": "bytes=100-199"}
    ) as response:
        assert response.status == 206 and await response.read() == audio[100:200]
    assert legacy_backend.calls[SPEAK] == 1
    assert emulator.tokens_used(VOLUME_PATH) == {APP_TOKEN}


async def test_a_volume_hit_streams_before_the_whole_object_is_read(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    # Past cache.volume.verify_max_bytes a hit streams; up to it, it is checked whole first.
    settings = databricks_settings(
        tmp_path,
        legacy_backend,
        **{
            "cache.memory.max_bytes": 0,
            "cache.volume.timeout_seconds": 5,
            "cache.volume.verify_max_bytes": 16 * 1024,
        },
    )
    client = await aiohttp_client(create_app(settings))
    _, _, audio = await speak(client, body())
    await settle(client.app)
    emulator.chunk_delay = 0.1  # 8 chunks of 8 KiB: the whole object takes 0.7 s or more
    started = time.monotonic()
    async with client.post(SPEAK, json=body(), headers=ALICE) as response:
        assert response.headers["X-TTS-Cache-Tier"] == "volume"
        first = await response.content.readany()
        first_byte = time.monotonic() - started
        rest = await response.read()
    total = time.monotonic() - started
    assert first + rest == audio
    assert first_byte < total / 2


def flip_bytes(emulator: FilesApiEmulator, path: str, first: int, last: int) -> None:
    """Invert bytes first..last (inclusive) of a stored object, keeping its length."""
    data = bytearray(emulator.read(path) or b"")
    for index in range(first, last + 1):
        data[index] ^= 0xFF
    emulator.write(path, bytes(data))


async def error_count(client: Any, kind: str) -> float:
    async with client.get("/_proxy/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'tts_proxy_errors_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no errors counter for {kind}")


async def test_a_corrupt_volume_object_is_a_miss_the_client_never_sees(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend, **{"cache.memory.max_bytes": 0})
    client = await aiohttp_client(create_app(settings))
    _, _, audio = await speak(client, body())
    await settle(client.app)
    flip_bytes(emulator, OBJECT, 100, 200)

    status, headers, again = await speak(client, body())

    # A complete, correct body from the backend: the corrupt object never reached the client.
    assert (status, headers["X-TTS-Cache"], again) == (200, "miss", audio)
    assert headers["Content-Length"] == str(len(audio))
    assert legacy_backend.calls[SPEAK] == 2
    await settle(client.app)  # the new recording's write waits for the removal
    assert emulator.count("DELETE", "files", ".mp3") == 1  # the corrupt object went
    assert emulator.read(OBJECT) == audio  # and the fresh one replaced it
    assert await error_count(client, "volume_corrupt") == 1
    assert await error_count(client, "volume") == 0
    status, headers, third = await speak(client, body())
    assert (status, headers["X-TTS-Cache"], third) == (200, "hit", audio)


async def test_a_range_on_the_audio_url_is_served_only_from_checked_bytes(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend, **{"cache.memory.max_bytes": 0})
    client = await aiohttp_client(create_app(settings))
    await speak(client, body())
    await settle(client.app)
    flip_bytes(emulator, OBJECT, 100, 200)
    async with client.get(
        "/_proxy/audio/t-1/m-1/af_nicole", headers={**ALICE, "Range": "bytes=0-99"}
    ) as response:
        # Bytes 0-99 are intact, but they belong to an object that fails its digest.
        assert response.status == 404
    assert await error_count(client, "volume_corrupt") == 1


@pytest.mark.parametrize("fault", ["fail", "throttle", "hang", "cut"])
async def test_every_injected_fault_still_answers_the_request_in_time(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
    fault: str,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend, **{"cache.memory.max_bytes": 0})
    client = await aiohttp_client(create_app(settings))
    _, _, audio = await speak(client, body())
    await settle(client.app)
    if fault == "fail":
        emulator.fail_next(20, status=500)
    elif fault == "throttle":
        emulator.throttle_next(20, retry_after=5)
    elif fault == "hang":
        emulator.hang_next(20)
    else:
        emulator.cut_next(20)
    started = time.monotonic()
    status, headers, again = await speak(client, body())
    elapsed = time.monotonic() - started
    # Answered (from the upstream, or a hit where the Volume recovered), within the budgets.
    assert status == 200 and again == audio
    assert elapsed < 1.0 + 5.0 + 1.0
    assert headers["X-TTS-Cache"] in {"hit", "miss"}


async def test_the_breaker_stops_calling_a_failing_volume_then_recovers(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(
        tmp_path,
        legacy_backend,
        **{
            "cache.memory.max_bytes": 0,
            "cache.volume.failure_threshold": 2,
            "cache.volume.cooldown_seconds": 0.5,
            "cache.volume.retries": 0,
        },
    )
    client = await aiohttp_client(create_app(settings))
    emulator.fail_next(1000, status=503)
    for i in range(4):
        status, _, _ = await speak(client, body(message_id=f"m-{i}"))
        assert status == 200
    await settle(client.app)
    volume = client.app[VOLUME]
    assert volume.breaker_state == "open"  # type: ignore[attr-defined]
    calls = len(emulator.requests)
    for i in range(3):
        assert (await speak(client, body(message_id=f"n-{i}")))[0] == 200
    await settle(client.app)
    assert len(emulator.requests) == calls  # nothing reached the failing Volume
    emulator.clear_faults()
    await asyncio.sleep(0.6)
    _, _, audio = await speak(client, body(message_id="after"))
    await settle(client.app)
    assert volume.breaker_state == "closed"  # type: ignore[attr-defined]
    assert emulator.read(OBJECT.replace("m-1", "after")) == audio


async def test_on_behalf_of_tokens_are_used_for_their_own_user_only(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    emulator.add_token("alice-token")
    emulator.add_token("bob-token")
    settings = databricks_settings(tmp_path, legacy_backend, **{"cache.volume.auth": "user"})
    client = await aiohttp_client(create_app(settings))
    alice = {**ALICE, "X-Forwarded-Access-Token": "alice-token"}
    bob = {"X-Forwarded-Email": "bob@example.com", "X-Forwarded-Access-Token": "bob-token"}
    await asyncio.gather(speak(client, body(), alice), speak(client, body(), bob))
    await settle(client.app)
    prefix = f"{VOLUME_PATH}/tts_audio/"
    assert emulator.tokens_used(prefix + "alice@example.com/") == {"alice-token"}
    assert emulator.tokens_used(prefix + "bob@example.com/") == {"bob-token"}
    assert APP_TOKEN not in emulator.tokens_used(prefix)


async def test_a_hanging_volume_costs_the_budget_on_a_few_requests_then_nothing(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(
        tmp_path,
        legacy_backend,
        **{
            "cache.volume.timeout_seconds": 10.0,  # the default; lookup_budget_ms: 500
            "cache.volume.failure_threshold": 3,
            "cache.min_uses": 1_000,  # nothing is stored: only lookups reach the Volume
        },
    )
    client = await aiohttp_client(create_app(settings))
    emulator.hang_next(1_000)  # connections accepted, never answered
    took: list[float] = []
    asked: list[int] = []
    for n in range(6):
        started = time.monotonic()
        status, headers, audio = await speak(client, body(message_id=f"m-{n}"))
        took.append(time.monotonic() - started)
        asked.append(emulator.count(endpoint="files"))
        assert (status, headers["X-TTS-Cache"]) == (200, "miss")
        assert audio == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
    # Three lookups waited the budget, then were misses; then the breaker was open.
    assert all(0.45 <= seconds < 1.5 for seconds in took[:3]), took
    assert all(seconds < 0.3 for seconds in took[3:]), took
    assert asked[2] == asked[-1] <= 3  # nothing asked of the Volume once it opened
    assert client.app[VOLUME].breaker_state == "open"
    async with client.get("/_proxy/ready") as response:
        ready = await response.json()
    assert ready["checks"]["volume"] == "breaker-open"


async def test_metrics_count_files_api_calls_and_the_wait_for_the_limiter(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    client = await aiohttp_client(create_app(databricks_settings(tmp_path, legacy_backend)))
    _, headers, _ = await speak(client, body())
    assert headers["X-TTS-Cache"] == "miss"
    await settle(client.app)

    async with client.get("/_proxy/metrics") as response:
        text = await response.text()
    assert 'tts_proxy_volume_calls_total{method="PUT",outcome="2xx"} 2.0' in text  # object, sidecar
    assert 'tts_proxy_volume_calls_total{method="GET",' in text
    assert "tts_proxy_volume_call_wait_seconds_total " in text


async def test_content_entries_on_a_databricks_volume_are_walked_and_purged(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend, **{"tts.save_by_default": True})
    client = await aiohttp_client(create_app(settings))
    without_ids = {"text": "Hello there", "provider": "replicate", "voice": "af_nicole"}
    _, headers, audio = await speak(client, without_ids)
    assert headers["X-TTS-Cache"] == "miss"
    await speak(client, body())
    await settle(client.app)
    digest = headers["Content-Location"].split("/")[4]
    variant = headers["Content-Location"].split("/")[5]
    stored = f"{VOLUME_PATH}/tts_audio/alice@example.com/_text/{digest}/{variant}.mp3"
    assert emulator.read(stored) == audio
    # The walks the janitor and the dashboard use find it beside the message's entry.
    volume = client.app[VOLUME]
    found = {(info.key.thread_id, info.key.message_id) for info in await volume.scan()}
    assert found == {("_text", digest), ("t-1", "m-1")}
    assert await volume.delete_prefix("alice@example.com") == 2
    assert emulator.read(stored) is None


async def test_metrics_and_stats_never_walk_a_files_api_volume(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend, **{"admin.token": "t" * 32})
    client = await aiohttp_client(create_app(settings))
    for number in range(3):
        status, _, _ = await speak(client, body(message_id=f"m-{number}"))
        assert status == 200
    await settle(client.app)
    listings = emulator.count("GET", "directories")

    async with client.get("/_proxy/metrics") as scraped:
        metrics = await scraped.text()
    headers = {"Authorization": f"Bearer {'t' * 32}"}
    async with client.get("/_proxy/admin/api/stats", headers=headers) as response:
        stats = await response.json()

    # A walk would cost a listing per folder from the replica's call budget on every scrape.
    assert emulator.count("GET", "directories") == listings
    assert 'tts_proxy_cache_entries{tier="volume"}' not in metrics
    assert "volume" not in stats["tiers"]
