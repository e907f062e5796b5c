"""The `openai` contract through the real proxy, driven by the official `openai` Python SDK.

The SDK's `base_url` points at the proxy, which stands in front of an OpenAI-compatible fake
(`tests/fakes/openai_speech.py`) that counts its calls. Callers are known by the HMAC of their
bearer API key, which is forwarded upstream and never stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, AuthenticationError

from proxy.access_log import ACCESS_LOGGER, access_log_options
from proxy.app import create_app
from tests.conftest import ServedAsInProduction, settings_for
from tests.fakes.openai_speech import SPEECH_PATH, FakeOpenAISpeech
from tests.support import settle

SECRET = "a-per-deployment-secret-of-32-characters"
HELLO = {"model": "gpt-4o-mini-tts", "input": "Hello from the cache", "voice": "coral"}


@pytest.fixture
async def openai_api() -> AsyncIterator[FakeOpenAISpeech]:
    async with FakeOpenAISpeech() as fake:
        yield fake


async def serve_proxy(
    upstream: FakeOpenAISpeech, tmp_path: Path, route: dict[str, Any] | None = None
) -> ServedAsInProduction:
    """The proxy on a real port, with its access log, its openai route in front of `upstream`."""
    declared = {"path": SPEECH_PATH, "contract": "openai", **(route or {})}
    settings = settings_for(
        tmp_path,
        upstream.url,
        **{"identity.api_key_secret": SECRET, "tts.routes": [declared]},
    )
    server = ServedAsInProduction(create_app(settings))
    await server.start_server(**access_log_options(settings, standalone=False))
    return server


def sdk(server: Any, key: str = "sk-alice") -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=str(server.make_url("/v1")), max_retries=0)


async def say(client: AsyncOpenAI, **params: Any) -> tuple[str | None, str, bytes]:
    """(X-TTS-Cache, Content-Type, audio) of one speech call, streamed as the SDK streams it."""
    async with client.audio.speech.with_streaming_response.create(**{**HELLO, **params}) as answer:
        audio = b"".join([chunk async for chunk in answer.iter_bytes()])
        return answer.headers.get("x-tts-cache"), answer.headers["content-type"], audio


@pytest.fixture
async def proxy(openai_api: FakeOpenAISpeech, tmp_path: Path) -> AsyncIterator[Any]:
    server = await serve_proxy(openai_api, tmp_path)
    yield server
    await server.close()


async def test_a_second_identical_call_is_a_hit_with_identical_bytes(
    proxy: Any, openai_api: FakeOpenAISpeech
) -> None:
    client = sdk(proxy)
    cache, content_type, first = await say(client)
    assert (cache, content_type) == ("miss", "audio/mpeg")
    assert first == FakeOpenAISpeech.audio_for(HELLO)
    cache, _, second = await say(client)
    assert cache == "hit" and second == first
    assert openai_api.calls == 1
    # The upstream got the SDK's own body and the caller's own key.
    assert openai_api.bodies == [HELLO]
    assert openai_api.authorizations == {"Bearer sk-alice": 1}


async def test_the_api_defaults_are_one_entry_and_other_values_are_misses(
    proxy: Any, openai_api: FakeOpenAISpeech
) -> None:
    client = sdk(proxy)
    assert (await say(client))[0] == "miss"
    for same in ({"speed": 1}, {"speed": 1.0}, {"response_format": "mp3"}):
        assert (await say(client, **same))[0] == "hit", same
    cache, _, faster = await say(client, speed=1.25)
    assert cache == "miss" and faster == FakeOpenAISpeech.audio_for({**HELLO, "speed": 1.25})
    cache, content_type, wav = await say(client, response_format="wav")
    assert (cache, content_type) == ("miss", "audio/wav")
    assert wav == FakeOpenAISpeech.audio_for({**HELLO, "response_format": "wav"})
    assert (await say(client, instructions="Whisper."))[0] == "miss"
    assert (await say(client, speed=1.25))[0] == "hit"
    assert openai_api.calls == 4


async def test_two_api_keys_never_share_an_entry(
    proxy: Any, openai_api: FakeOpenAISpeech, tmp_path: Path
) -> None:
    alice, bob = sdk(proxy, "sk-alice"), sdk(proxy, "sk-bob")
    assert (await say(alice))[0] == "miss"
    assert (await say(bob))[0] == "miss"
    assert (await say(alice))[0] == "hit" and (await say(bob))[0] == "hit"
    assert openai_api.authorizations == {"Bearer sk-alice": 1, "Bearer sk-bob": 1}
    # A key the upstream refuses is refused every time: nothing of it is stored.
    stranger = sdk(proxy, "sk-revoked")
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            await say(stranger)
    assert openai_api.calls == 4
    await settle(proxy.app)
    root = tmp_path / "volume" / "tts_audio"
    users = sorted(p.name for p in root.iterdir())
    assert len(users) == 2 and all(u.startswith("_key-") and len(u) == 37 for u in users)
    # The keys themselves are nowhere on the Volume: not in a path, not in a sidecar.
    for path in root.rglob("*"):
        assert "sk-" not in str(path.relative_to(root))
        if path.is_file():
            assert b"sk-alice" not in path.read_bytes() and b"sk-bob" not in path.read_bytes()


async def test_fifty_concurrent_identical_calls_cost_one_upstream_call(
    proxy: Any, openai_api: FakeOpenAISpeech
) -> None:
    openai_api.chunk_delay = 0.02  # the answer takes a while: the calls overlap it
    client = sdk(proxy)
    answers = await asyncio.gather(*(say(client) for _ in range(50)))
    assert openai_api.calls == 1
    expected = FakeOpenAISpeech.audio_for(HELLO)
    assert all(audio == expected for _, _, audio in answers)
    assert {cache for cache, _, _ in answers} <= {"miss", "hit"}


async def test_the_audio_url_serves_a_keys_entry_to_that_key_only(proxy: Any) -> None:
    async with aiohttp.ClientSession() as session:
        url = proxy.make_url(SPEECH_PATH)
        alice = {"Authorization": "Bearer sk-alice"}
        async with session.post(url, json=HELLO, headers=alice) as response:
            assert response.headers["X-TTS-Cache"] == "miss"
            location = response.headers["Content-Location"]
            audio = await response.read()
        assert location.startswith("/_proxy/audio/_text/")
        async with session.get(proxy.make_url(location), headers=alice) as response:
            assert response.status == 200 and await response.read() == audio
        for other in ({"Authorization": "Bearer sk-bob"}, {}):
            async with session.get(proxy.make_url(location), headers=other) as response:
                assert response.status == 404


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({}, HELLO, "no-identity"),
        ({"Authorization": "Basic YTpi"}, HELLO, "no-identity"),
        (
            {"Authorization": "Bearer sk-alice"},
            {**HELLO, "stream_format": "sse"},
            "undeclared-field",
        ),
        ({"Authorization": "Bearer sk-alice"}, {**HELLO, "voice": {"id": "v1"}}, "invalid-field"),
    ],
)
async def test_calls_the_contract_cannot_key_are_forwarded_and_say_why(
    proxy: Any,
    openai_api: FakeOpenAISpeech,
    headers: dict[str, str],
    body: dict[str, Any],
    reason: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logging.getLogger(ACCESS_LOGGER), "propagate", True)
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.make_url(SPEECH_PATH), json=body, headers=headers) as r:
            await r.read()
            assert r.headers["X-TTS-Cache"] == "disabled"
            assert r.headers["Cache-Status"] == f"tts-cache-proxy; fwd=bypass; detail={reason}"
    assert openai_api.calls == 1  # forwarded as it came
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [line["reason"] for line in lines if line["path"] == SPEECH_PATH] == [reason]
    # The bearer key is never written to a log line.
    assert not any("sk-alice" in record.getMessage() for record in caplog.records)


async def test_the_rest_of_the_api_passes_through(proxy: Any) -> None:
    models = await sdk(proxy).models.list()
    assert [model.id for model in models.data] == ["gpt-4o-mini-tts"]


async def test_the_shared_scope_serves_one_entry_to_every_key(
    openai_api: FakeOpenAISpeech, tmp_path: Path
) -> None:
    server = await serve_proxy(openai_api, tmp_path, route={"scope": "shared"})
    try:
        assert (await say(sdk(server, "sk-alice")))[0] == "miss"
        cache, _, audio = await say(sdk(server, "sk-bob"))
        assert cache == "hit" and audio == FakeOpenAISpeech.audio_for(HELLO)
        assert openai_api.calls == 1
    finally:
        await server.close()
