"""The proxy synthesizing speak misses itself, from the Replicate and Deepgram emulators."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import create_app
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.fakes.deepgram_api import FakeDeepgramApi
from tests.fakes.replicate_api import FakeReplicateApi
from tests.support import ALICE, SPEAK, settle, speak_body

REPLICATE_TOKEN = "r8_Zq4mProxyToken0123456789abcdefABCDEF0"
DEEPGRAM_KEY = "4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d"


def body(**change: Any) -> dict[str, Any]:
    """A cacheable speak body."""
    return speak_body(**{"text": "Hello **there**, see https://example.com", **change})


@pytest.fixture
async def replicate_api() -> AsyncIterator[FakeReplicateApi]:
    async with FakeReplicateApi(tokens=[REPLICATE_TOKEN], echo_auth_in_errors=True) as api:
        yield api


@pytest.fixture
async def deepgram_api() -> AsyncIterator[FakeDeepgramApi]:
    async with FakeDeepgramApi(keys=[DEEPGRAM_KEY], echo_auth_in_errors=True) as api:
        yield api


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)
    monkeypatch.setenv("DEEPGRAM_API_KEY", DEEPGRAM_KEY)


async def proxy(
    aiohttp_client: Any,
    tmp_path: Path,
    backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    **extra: Any,
) -> Any:
    settings = settings_for(
        tmp_path,
        backend.url,
        **{
            "upstream.kind": "replicate",
            "upstream.fallback": "deepgram",
            "upstream.replicate_base_url": replicate_api.url,
            "upstream.deepgram_base_url": deepgram_api.url,
            "upstream.provider_timeout_seconds": 0.5,
            **extra,
        },
    )
    return await aiohttp_client(create_app(settings))


async def speak(client: Any, payload: dict[str, Any]) -> tuple[int, Any, bytes]:
    async with client.post(SPEAK, json=payload, headers=ALICE) as response:
        return response.status, response.headers.copy(), await response.read()


@pytest.mark.usefixtures("credentials")
async def test_replicate_miss_then_hit(
    aiohttp_client: Any,
    tmp_path: Path,
    legacy_backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
) -> None:
    client = await proxy(aiohttp_client, tmp_path, legacy_backend, replicate_api, deepgram_api)
    status, headers, audio = await speak(client, body(provider="replicate"))
    assert (status, headers["X-TTS-Cache"], headers["X-TTS-Provider"]) == (200, "miss", "replicate")
    assert audio == FakeReplicateApi.audio_for("Hello there, see", "af_nicole")
    status, headers, again = await speak(client, body(provider="replicate"))
    assert (headers["X-TTS-Cache"], again) == ("hit", audio)
    assert replicate_api.calls["create"] == 1
    assert legacy_backend.calls[SPEAK] == 0  # the legacy backend is not asked at all


@pytest.mark.usefixtures("credentials")
async def test_deepgram_miss_then_hit(
    aiohttp_client: Any,
    tmp_path: Path,
    legacy_backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
) -> None:
    client = await proxy(
        aiohttp_client,
        tmp_path,
        legacy_backend,
        replicate_api,
        deepgram_api,
        **{"upstream.kind": "deepgram", "upstream.fallback": "replicate"},
    )
    payload = body(voice="aura-2-thalia-en", provider="deepgram")
    _, headers, audio = await speak(client, payload)
    assert headers["X-TTS-Cache"] == "miss" and headers["X-TTS-Provider"] == "deepgram"
    _, headers, again = await speak(client, payload)
    assert headers["X-TTS-Cache"] == "hit" and again == audio
    assert deepgram_api.calls["speak"] == 1
    assert deepgram_api.requests[0].model == "aura-2-thalia-en"


@pytest.mark.usefixtures("credentials")
@pytest.mark.parametrize("provider", ["replicate", None])
async def test_fallback_audio_is_served_but_never_stored(
    aiohttp_client: Any,
    tmp_path: Path,
    legacy_backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    provider: str | None,
) -> None:
    client = await proxy(aiohttp_client, tmp_path, legacy_backend, replicate_api, deepgram_api)
    replicate_api.inject("unauthorized", times=None)
    for _ in range(2):
        status, headers, _ = await speak(client, body(provider=provider))
        assert status == 200 and headers["X-TTS-Provider"] == "deepgram"
        assert headers["X-TTS-Cache"] == "miss" and "stored" not in headers["Cache-Status"]
    assert deepgram_api.calls["speak"] == 2
    assert deepgram_api.requests[0].model == "aura-2-thalia-en"
    await settle(client.app)
    assert not list((tmp_path / "volume").rglob("*.meta.json"))


@pytest.mark.usefixtures("credentials")
async def test_both_failing_is_a_503_without_secrets(
    aiohttp_client: Any,
    tmp_path: Path,
    legacy_backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await proxy(aiohttp_client, tmp_path, legacy_backend, replicate_api, deepgram_api)
    replicate_api.inject("error", times=None)
    deepgram_api.inject("unauthorized", times=None)
    status, headers, raw = await speak(client, body())
    assert status == 503 and headers["X-TTS-Cache"] == "miss"
    text = raw.decode()
    assert "TTS failed with all providers" in text and "replicate" in text and "deepgram" in text
    for secret in (REPLICATE_TOKEN, DEEPGRAM_KEY):
        assert secret not in text
        assert secret not in caplog.text


@pytest.mark.usefixtures("credentials")
async def test_cut_short_audio_is_not_stored(
    aiohttp_client: Any,
    tmp_path: Path,
    legacy_backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
) -> None:
    client = await proxy(
        aiohttp_client,
        tmp_path,
        legacy_backend,
        replicate_api,
        deepgram_api,
        **{"upstream.kind": "deepgram", "upstream.fallback": ""},
    )
    deepgram_api.inject("cut", times=1)
    payload = body(voice="aura-2-thalia-en")
    with pytest.raises(aiohttp.ClientPayloadError):
        await speak(client, payload)
    await settle(client.app)
    _, headers, _ = await speak(client, payload)
    assert headers["X-TTS-Cache"] == "miss"
    assert deepgram_api.calls["speak"] == 2


@pytest.mark.usefixtures("credentials")
async def test_a_slow_provider_falls_back_within_its_timeout(
    aiohttp_client: Any,
    tmp_path: Path,
    legacy_backend: FakeLegacyBackend,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
) -> None:
    client = await proxy(aiohttp_client, tmp_path, legacy_backend, replicate_api, deepgram_api)
    replicate_api.inject("slow", times=1, delay=10.0)
    started = time.monotonic()
    status, headers, _ = await speak(client, body())
    assert status == 200 and headers["X-TTS-Provider"] == "deepgram"
    assert time.monotonic() - started < 0.5 + 2.0


def test_missing_credentials_stop_start_up(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[upstream]\nkind = "replicate"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "REPLICATE_API_TOKEN" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
