"""The proxy with its Volume on the Files API emulator, authenticated by the real databricks-sdk."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.app import CACHE, VOLUME, create_app
from proxy.config import Settings
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.fakes.files_api import FilesApiEmulator
from tests.support import ALICE, SPEAK
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
    await first.app[CACHE].drain()
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
    settings = databricks_settings(
        tmp_path, legacy_backend, **{"cache.memory.max_bytes": 0, "cache.volume.timeout_seconds": 5}
    )
    client = await aiohttp_client(create_app(settings))
    _, _, audio = await speak(client, body())
    await client.app[CACHE].drain()
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


async def test_a_corrupt_volume_object_is_a_miss_and_is_replaced(
    aiohttp_client: Any,
    legacy_backend: FakeLegacyBackend,
    tmp_path: Path,
    emulator: FilesApiEmulator,
) -> None:
    settings = databricks_settings(tmp_path, legacy_backend, **{"cache.memory.max_bytes": 0})
    client = await aiohttp_client(create_app(settings))
    _, _, audio = await speak(client, body())
    await client.app[CACHE].drain()
    emulator.corrupt(OBJECT)
    # The streamed hit starts, then is cut before its final chunk: never served as complete.
    with pytest.raises(Exception):  # noqa: B017 - aiohttp payload error, any kind
        await speak(client, body())
    assert emulator.read(OBJECT) is None  # the torn entry was removed
    status, headers, again = await speak(client, body())
    assert (status, headers["X-TTS-Cache"], again) == (200, "miss", audio)
    await client.app[CACHE].drain()
    assert emulator.read(OBJECT) == audio
    assert client.app[CACHE].errors["volume"] >= 1


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
    await client.app[CACHE].drain()
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
    await client.app[CACHE].drain()
    volume = client.app[VOLUME]
    assert volume.breaker_state == "open"  # type: ignore[attr-defined]
    calls = len(emulator.requests)
    for i in range(3):
        assert (await speak(client, body(message_id=f"n-{i}")))[0] == 200
    await client.app[CACHE].drain()
    assert len(emulator.requests) == calls  # nothing reached the failing Volume
    emulator.clear_faults()
    await asyncio.sleep(0.6)
    _, _, audio = await speak(client, body(message_id="after"))
    await client.app[CACHE].drain()
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
    await client.app[CACHE].drain()
    prefix = f"{VOLUME_PATH}/tts_audio/"
    assert emulator.tokens_used(prefix + "alice@example.com/") == {"alice-token"}
    assert emulator.tokens_used(prefix + "bob@example.com/") == {"bob-token"}
    assert APP_TOKEN not in emulator.tokens_used(prefix)
