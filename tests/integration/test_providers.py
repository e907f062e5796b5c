"""Replicate, Deepgram and the fallback chain, with the real client libraries, against emulators."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.config import ConfigError, Settings, UpstreamSettings, load_settings
from proxy.routes.responses import json_error
from proxy.speak import SpeakRequest
from proxy.upstreams.base import SpeakCall, UpstreamError, UpstreamResponse
from proxy.upstreams.deepgram import DeepgramUpstream
from proxy.upstreams.http import client_session
from proxy.upstreams.provider_setup import build_synthesizer, check_credentials
from proxy.upstreams.providers import (
    AllProvidersFailed,
    MissingCredential,
    ProviderChain,
    redact,
)
from proxy.upstreams.replicate import ReplicateUpstream
from tests.fakes.deepgram_api import FakeDeepgramApi
from tests.fakes.replicate_api import FakeReplicateApi

REPLICATE_TOKEN = "r8_Zq4mTestToken0123456789abcdefABCDEF0"
DEEPGRAM_KEY = "0f3c9d2e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e"
KOKORO_VERSION = "f559560eb822dc509045f3921a1921234918b91739db4bf3daab2169b71c7a13"
TIMEOUT = 0.5
# The timeout plus what a loaded machine may add before the fallback answers.
MARGIN = 1.5
TEXT = "Hello from the chat message"


@pytest.fixture
async def replicate_api() -> AsyncIterator[FakeReplicateApi]:
    """A started FakeReplicateApi that echoes Authorization in its errors, stopped after."""
    async with FakeReplicateApi(tokens=[REPLICATE_TOKEN], echo_auth_in_errors=True) as api:
        yield api


@pytest.fixture
async def deepgram_api() -> AsyncIterator[FakeDeepgramApi]:
    """A started FakeDeepgramApi that echoes Authorization in its errors, stopped after."""
    async with FakeDeepgramApi(keys=[DEEPGRAM_KEY], echo_auth_in_errors=True) as api:
        yield api


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The session the app gives its upstreams."""
    async with client_session(UpstreamSettings()) as upstream_session:
        yield upstream_session


def settings_for(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, **dotted: Any
) -> Settings:
    """Replicate first, Deepgram as the fallback, both at the emulators, a short timeout."""
    overrides: dict[str, Any] = {
        "upstream.kind": "replicate",
        "upstream.fallback": "deepgram",
        "upstream.replicate_base_url": replicate_api.url,
        "upstream.deepgram_base_url": deepgram_api.url,
        "upstream.provider_timeout_seconds": TIMEOUT,
        "upstream.connect_timeout_seconds": TIMEOUT,
    }
    overrides.update(dotted)
    return load_settings(env={}, overrides=overrides)


ENVIRON = {"REPLICATE_API_TOKEN": REPLICATE_TOKEN, "DEEPGRAM_API_KEY": DEEPGRAM_KEY}


def chain_for(settings: Settings, session: aiohttp.ClientSession) -> ProviderChain:
    """The chain the app would build, with the emulators' credentials."""
    chain = build_synthesizer(settings, session, environ=ENVIRON)
    assert chain is not None
    return chain


def speak_call(
    text: str = TEXT, voice: str = "af_nicole", provider: str | None = None
) -> SpeakCall:
    """A speak miss as the cache middleware hands it to the synthesizer."""
    speak = SpeakRequest(
        text=text,
        voice=voice,
        provider=provider,
        message_id="m-1",
        thread_id="t-1",
        save_to_volume=True,
    )
    return SpeakCall(
        raw_path="/api/tts/speak",
        headers=CIMultiDict(),
        request_id="r-1",
        body=json.dumps({"text": text, "voice": voice}).encode(),
        speak=speak,
        identity=None,
    )


async def consume(response: UpstreamResponse) -> tuple[bytes, list[float]]:
    """Read the body as fill.py does; the arrival time of each chunk too."""
    body = bytearray()
    arrivals: list[float] = []
    try:
        async for chunk in response.iter_chunks():
            body += chunk
            arrivals.append(time.monotonic())
    finally:
        response.close()
    return bytes(body), arrivals


# Each provider alone


async def test_replicate_runs_the_pinned_model_and_streams_its_file(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    replicate_api.chunk_size, replicate_api.chunk_delay = 4096, 0.02
    upstream = ReplicateUpstream(
        settings_for(replicate_api, deepgram_api).upstream, session, api_token=REPLICATE_TOKEN
    )
    try:
        started = time.monotonic()
        response = await upstream.open(speak_call())
        body, arrivals = await consume(response)
    finally:
        await upstream.aclose()

    audio = FakeReplicateApi.audio_for(TEXT, "af_nicole")
    assert body == audio
    assert response.status == 200
    assert response.headers["Content-Type"] == "audio/wav"
    assert response.headers["Content-Length"] == str(len(audio))
    assert response.headers["X-TTS-Provider"] == "replicate"
    # Streamed: the first bytes were in hand well before the file was complete.
    assert len(arrivals) > 2
    assert arrivals[0] - started < arrivals[-1] - started - 0.1
    (prediction,) = replicate_api.predictions
    assert prediction.version == KOKORO_VERSION
    assert prediction.input == {"text": TEXT, "voice": "af_nicole", "speed": 1.0}
    assert prediction.prefer == "wait=1"
    assert prediction.authorization == f"Bearer {REPLICATE_TOKEN}"
    assert replicate_api.calls["create"] == 1
    # The file host gets no API token.
    assert replicate_api.file_authorizations == [None]


async def test_replicate_official_model_uses_the_models_route(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    settings = settings_for(
        replicate_api, deepgram_api, **{"upstream.replicate_model": "jaaari/kokoro-82m"}
    )
    upstream = ReplicateUpstream(settings.upstream, session, api_token=REPLICATE_TOKEN)
    try:
        body, _ = await consume(await upstream.open(speak_call(voice="am_adam")))
    finally:
        await upstream.aclose()
    assert body == FakeReplicateApi.audio_for(TEXT, "am_adam")
    (prediction,) = replicate_api.predictions
    assert (prediction.model, prediction.version) == ("jaaari/kokoro-82m", "")


async def test_replicate_polls_a_prediction_still_running_after_the_wait(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    replicate_api.polls_before_done = 2
    upstream = ReplicateUpstream(
        settings_for(replicate_api, deepgram_api).upstream,
        session,
        api_token=REPLICATE_TOKEN,
        poll_interval=0.01,
    )
    try:
        body, _ = await consume(await upstream.open(speak_call()))
    finally:
        await upstream.aclose()
    assert body == FakeReplicateApi.audio_for(TEXT, "af_nicole")
    assert replicate_api.calls["get"] == 3


async def test_replicate_untyped_file_is_typed_by_its_name(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    replicate_api.file_content_type = "application/octet-stream"
    upstream = ReplicateUpstream(
        settings_for(replicate_api, deepgram_api).upstream, session, api_token=REPLICATE_TOKEN
    )
    try:
        response = await upstream.open(speak_call())
        await consume(response)
    finally:
        await upstream.aclose()
    assert response.headers["Content-Type"] == "audio/wav"


async def test_deepgram_streams_chunks_as_they_arrive(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi
) -> None:
    deepgram_api.chunk_delay = 0.03
    upstream = DeepgramUpstream(
        settings_for(replicate_api, deepgram_api).upstream, api_key=DEEPGRAM_KEY
    )
    try:
        started = time.monotonic()
        response = await upstream.open(speak_call(voice="aura-2-andromeda-en"))
        body, arrivals = await consume(response)
    finally:
        await upstream.aclose()

    assert body == FakeDeepgramApi.audio_for(TEXT, "aura-2-andromeda-en")
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.headers["X-TTS-Provider"] == "deepgram"
    assert response.headers["X-TTS-Voice"] == "aura-2-andromeda-en"
    assert len(arrivals) > 2
    assert arrivals[0] - started < arrivals[-1] - started - 0.05
    (request,) = deepgram_api.requests
    assert (request.model, request.encoding, request.container) == (
        "aura-2-andromeda-en",
        "mp3",
        None,
    )
    assert request.text == TEXT
    assert request.authorization == f"Token {DEEPGRAM_KEY}"
    assert request.accept_encoding == "identity"


async def test_deepgram_linear16_asks_for_a_wav_container(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi
) -> None:
    deepgram_api.content_length = True
    settings = settings_for(
        replicate_api, deepgram_api, **{"upstream.deepgram_encoding": "linear16"}
    )
    upstream = DeepgramUpstream(settings.upstream, api_key=DEEPGRAM_KEY)
    try:
        response = await upstream.open(speak_call(voice="aura-2-thalia-en"))
        body, _ = await consume(response)
    finally:
        await upstream.aclose()
    assert (deepgram_api.requests[0].encoding, deepgram_api.requests[0].container) == (
        "linear16",
        "wav",
    )
    assert response.headers["Content-Type"] == "audio/wav"
    assert response.headers["Content-Length"] == str(len(body))


async def test_deepgram_speaks_a_kokoro_voice_as_thalia(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    chain = chain_for(
        settings_for(
            replicate_api, deepgram_api, **{"upstream.kind": "deepgram", "upstream.fallback": ""}
        ),
        session,
    )
    try:
        response = await chain.open(speak_call(voice="af_nicole"))
        body, _ = await consume(response)
    finally:
        await chain.aclose()
    assert deepgram_api.requests[0].model == "aura-2-thalia-en"
    assert body == FakeDeepgramApi.audio_for(TEXT, "aura-2-thalia-en")
    assert response.headers["X-TTS-Voice"] == "aura-2-thalia-en"
    # Not the voice asked for: never to be stored under it.
    assert response.headers["X-TTS-Fallback"] == "voice"


# The fallback chain

REPLICATE_FAULTS = [
    "unauthorized",
    "throttled",
    "error",
    "slow",
    "failed",
    "empty",
    "download_error",
    "cut_before",
]


@pytest.mark.parametrize("fault", REPLICATE_FAULTS)
async def test_replicate_failing_before_audio_falls_back_to_deepgram(
    fault: str,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    replicate_api.inject(fault, delay=10.0)  # type: ignore[arg-type]
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    try:
        started = time.monotonic()
        response = await chain.open(speak_call(provider="replicate"))
        elapsed = time.monotonic() - started
        body, _ = await consume(response)
    finally:
        await chain.aclose()

    assert body == FakeDeepgramApi.audio_for(TEXT, "aura-2-thalia-en")
    assert response.headers["X-TTS-Provider"] == "deepgram"
    assert response.headers["X-TTS-Voice"] == "aura-2-thalia-en"
    assert response.headers["X-TTS-Fallback"] == "provider, voice"
    assert deepgram_api.requests[0].model == "aura-2-thalia-en"
    # A POST is never retried by the library, not even on 429: the fallback answers instead.
    assert replicate_api.calls["create"] == 1
    assert elapsed < TIMEOUT + MARGIN
    assert REPLICATE_TOKEN not in caplog.text
    assert TEXT not in caplog.text


DEEPGRAM_FAULTS = ["unauthorized", "throttled", "error", "slow", "empty", "cut_before"]


@pytest.mark.parametrize("fault", DEEPGRAM_FAULTS)
async def test_deepgram_failing_before_audio_falls_back_to_replicate(
    fault: str,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
) -> None:
    deepgram_api.inject(fault, delay=10.0)  # type: ignore[arg-type]
    settings = settings_for(
        replicate_api,
        deepgram_api,
        **{"upstream.kind": "deepgram", "upstream.fallback": "replicate"},
    )
    chain = chain_for(settings, session)
    try:
        started = time.monotonic()
        response = await chain.open(speak_call(voice="aura-2-andromeda-en"))
        elapsed = time.monotonic() - started
        body, _ = await consume(response)
    finally:
        await chain.aclose()

    # Kokoro does not know Aura voices: the configured default voice speaks instead.
    assert body == FakeReplicateApi.audio_for(TEXT, "af_nicole")
    assert replicate_api.predictions[0].voice == "af_nicole"
    assert response.headers["X-TTS-Provider"] == "replicate"
    assert response.headers["X-TTS-Fallback"] == "provider, voice"
    assert deepgram_api.calls["speak"] == 1
    assert elapsed < TIMEOUT + MARGIN


async def test_unreachable_replicate_falls_back(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    await replicate_api.stop()
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    try:
        response = await chain.open(speak_call())
        await consume(response)
    finally:
        await chain.aclose()
    assert response.headers["X-TTS-Provider"] == "deepgram"


async def test_the_provider_the_client_picked_goes_first(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    try:
        response = await chain.open(speak_call(voice="aura-2-zeus-en", provider="deepgram"))
        await consume(response)
    finally:
        await chain.aclose()
    assert response.headers["X-TTS-Provider"] == "deepgram"
    assert "X-TTS-Fallback" not in response.headers
    assert replicate_api.calls["create"] == 0


@pytest.mark.parametrize(
    ("kind", "fallback", "fault"),
    [("replicate", "deepgram", "cut"), ("deepgram", "replicate", "cut")],
)
async def test_audio_cut_short_after_bytes_is_a_broken_stream_not_a_fallback(
    kind: str,
    fallback: str,
    fault: str,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
) -> None:
    primary = replicate_api if kind == "replicate" else deepgram_api
    primary.inject(fault)  # type: ignore[arg-type]
    settings = settings_for(
        replicate_api, deepgram_api, **{"upstream.kind": kind, "upstream.fallback": fallback}
    )
    chain = chain_for(settings, session)
    try:
        response = await chain.open(speak_call(voice="aura-2-thalia-en", provider=kind))
        assert response.headers["X-TTS-Provider"] == kind
        with pytest.raises(UpstreamError):
            await consume(response)
    finally:
        await chain.aclose()
    # Bytes went to the client already: a second provider's audio cannot be spliced on.
    assert replicate_api.calls["create"] + deepgram_api.calls["speak"] == 1


@pytest.mark.parametrize("kind", ["replicate", "deepgram"])
async def test_a_stream_stalling_after_its_first_bytes_breaks_within_the_timeout(
    kind: str,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
) -> None:
    replicate_api.chunk_size, replicate_api.chunk_delay = 4096, 3.0
    deepgram_api.chunk_delay = 3.0
    settings = settings_for(
        replicate_api, deepgram_api, **{"upstream.kind": kind, "upstream.fallback": ""}
    )
    chain = chain_for(settings, session)
    try:
        response = await chain.open(speak_call(voice="aura-2-thalia-en", provider=kind))
        started = time.monotonic()
        with pytest.raises(UpstreamError):
            await consume(response)
        assert time.monotonic() - started < TIMEOUT + MARGIN
    finally:
        await chain.aclose()


@pytest.mark.parametrize("kind", ["replicate", "deepgram"])
async def test_closing_a_stream_early_releases_it(
    kind: str,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
) -> None:
    replicate_api.chunk_size, replicate_api.chunk_delay = 1024, 0.05
    deepgram_api.chunk_size, deepgram_api.chunk_delay = 1024, 0.05
    settings = settings_for(
        replicate_api, deepgram_api, **{"upstream.kind": kind, "upstream.fallback": ""}
    )
    chain = chain_for(settings, session)
    try:
        response = await chain.open(speak_call(voice="aura-2-thalia-en", provider=kind))
        async for _ in response.iter_chunks():
            break
        response.close()
        await asyncio.sleep(0.05)
        replicate_api.chunk_delay = deepgram_api.chunk_delay = 0.0
        # The connection is free again: the next call is answered in full.
        body, _ = await consume(await chain.open(speak_call(voice="aura-2-thalia-en")))
    finally:
        await chain.aclose()
    assert len(body) > 1024


async def test_both_failing_is_a_503_naming_each_error_without_secrets(
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Both emulators echo the Authorization header they got into these errors.
    replicate_api.inject("unauthorized")
    deepgram_api.inject("error")
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    try:
        with pytest.raises(AllProvidersFailed) as failed:
            await chain.open(speak_call(text="A private message, 42 words long"))
    finally:
        await chain.aclose()

    error = failed.value
    assert error.status == 503
    assert error.detail.startswith("TTS failed with all providers: replicate: HTTP 401: ")
    assert "; deepgram: HTTP 500: Internal server error" in error.detail
    assert len(error.errors) == 2
    for secret in (REPLICATE_TOKEN, DEEPGRAM_KEY, "r8_"):
        assert secret not in error.detail
        assert secret not in caplog.text
    assert "private message" not in caplog.text
    # What the client gets, through the same helper the cache middleware answers errors with.
    answer = json_error(error.status, error.detail)
    assert answer.status == 503
    assert answer.text is not None
    assert json.loads(answer.text) == error.body()


async def test_both_slow_fail_within_both_timeouts(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    replicate_api.inject("slow", delay=10.0)
    deepgram_api.inject("slow", delay=10.0)
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    try:
        started = time.monotonic()
        with pytest.raises(AllProvidersFailed) as failed:
            await chain.open(speak_call())
        elapsed = time.monotonic() - started
    finally:
        await chain.aclose()
    assert failed.value.detail == (
        "TTS failed with all providers: replicate: timed out after 0.5s; "
        "deepgram: timed out after 0.5s"
    )
    assert 2 * TIMEOUT <= elapsed < 2 * TIMEOUT + MARGIN


async def test_a_prediction_abandoned_on_timeout_is_canceled(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    replicate_api.polls_before_done = 10_000
    settings = settings_for(replicate_api, deepgram_api, **{"upstream.fallback": ""})
    chain = chain_for(settings, session)
    try:
        with pytest.raises(AllProvidersFailed, match="replicate: timed out"):
            await chain.open(speak_call())
        for _ in range(100):
            if replicate_api.canceled:
                break
            await asyncio.sleep(0.02)
    finally:
        await chain.aclose()
    assert replicate_api.canceled == ["pred000001"]


# Text cleaning


async def test_text_is_cleaned_before_it_reaches_the_provider(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    replicate_api.inject("error")
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    markdown = "## Answer\n**Yes**, see [the docs](https://example.com) 🎉\n```\ncode\n```"
    try:
        await consume(await chain.open(speak_call(text=markdown)))
    finally:
        await chain.aclose()
    assert replicate_api.predictions[0].text == "Answer. Yes, see the docs"
    assert deepgram_api.requests[0].text == "Answer. Yes, see the docs"


async def test_a_long_message_is_cleaned_too(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    long_markdown = "- **word** [link](https://example.com)\n" * 1000
    try:
        await consume(await chain.open(speak_call(text=long_markdown)))
    finally:
        await chain.aclose()
    assert replicate_api.predictions[0].text == " ".join(["word link."] * 1000)


async def test_clean_text_none_sends_the_text_as_written(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    settings = settings_for(replicate_api, deepgram_api, **{"tts.clean_text": "none"})
    chain = chain_for(settings, session)
    try:
        await consume(await chain.open(speak_call(text="  **Yes** 🎉 ")))
    finally:
        await chain.aclose()
    assert replicate_api.predictions[0].text == "**Yes** 🎉"


async def test_nothing_left_to_speak_calls_no_provider(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    chain = chain_for(settings_for(replicate_api, deepgram_api), session)
    try:
        with pytest.raises(UpstreamError) as refused:
            await chain.open(speak_call(text="https://example.com 🎉"))
    finally:
        await chain.aclose()
    assert refused.value.status == 400
    assert replicate_api.calls["create"] + deepgram_api.calls["speak"] == 0


# The factory and credentials


async def test_http_kind_builds_no_synthesizer(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    settings = settings_for(
        replicate_api, deepgram_api, **{"upstream.kind": "http", "upstream.fallback": ""}
    )
    assert build_synthesizer(settings, session, environ={}) is None
    check_credentials(settings.upstream, {})


async def test_factory_orders_the_configured_providers(
    replicate_api: FakeReplicateApi, deepgram_api: FakeDeepgramApi, session: aiohttp.ClientSession
) -> None:
    alone = chain_for(
        settings_for(replicate_api, deepgram_api, **{"upstream.fallback": ""}), session
    )
    both = chain_for(settings_for(replicate_api, deepgram_api), session)
    assert alone.names == ("replicate",)
    assert both.names == ("replicate", "deepgram")
    await alone.aclose()
    await both.aclose()


@pytest.mark.parametrize(
    ("environ", "key", "variable"),
    [
        ({"DEEPGRAM_API_KEY": DEEPGRAM_KEY}, "upstream.kind", "REPLICATE_API_TOKEN"),
        ({"REPLICATE_API_TOKEN": REPLICATE_TOKEN}, "upstream.fallback", "DEEPGRAM_API_KEY"),
        ({"REPLICATE_API_TOKEN": " ", "DEEPGRAM_API_KEY": "x"}, "upstream.kind", "REPLICATE"),
    ],
)
async def test_a_missing_credential_is_a_config_error_naming_the_variable(
    environ: dict[str, str],
    key: str,
    variable: str,
    replicate_api: FakeReplicateApi,
    deepgram_api: FakeDeepgramApi,
    session: aiohttp.ClientSession,
) -> None:
    settings = settings_for(replicate_api, deepgram_api)
    with pytest.raises(MissingCredential) as missing:
        check_credentials(settings.upstream, environ)
    assert isinstance(missing.value, ConfigError)
    assert missing.value.key == key
    assert variable in str(missing.value)
    with pytest.raises(MissingCredential):
        build_synthesizer(settings, session, environ=environ)


# Redaction


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"got Authorization: Bearer {REPLICATE_TOKEN}", "got Authorization: ***"),
        (f"(got Authorization: Token {DEEPGRAM_KEY})", "(got Authorization: ***)"),
        (f"token {REPLICATE_TOKEN} refused", "token *** refused"),
        ("header 'Authorization': 'Token abcdef0123456789'", "header 'Authorization': '***'"),
        ("Token 0123456789abcdef was revoked", "*** was revoked"),
        ("bearer eyJhbGciOiJIUzI1NiJ9.e30.sig0", "***"),
        ("You did not pass a valid authentication token", None),
        ("Invalid token provided for this model", None),
    ],
)
def test_redact_removes_anything_shaped_like_a_credential(text: str, kept: str | None) -> None:
    assert redact(text) == (text if kept is None else kept)


def test_redact_removes_configured_secrets_anywhere() -> None:
    assert redact("key=plainsecret;", ["plainsecret"]) == "key=***;"
    assert redact("short ab stays", ["ab"]) == "short ab stays"
