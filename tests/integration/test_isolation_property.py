"""Property: under any interleaving, nobody hears audio made for another request's key or text."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.support import settle

USERS = ["alice@example.com", "bob@example.com", "carol@example.com"]
MESSAGES = ["m-1", "m-2"]
VOICES = ["af_nicole", "af_bella"]
THREADS = ["t-1", "t-2"]
SIZE = 4096

# One request: (user, thread, message, voice, text variant, trusted identity header?, wave).
request_strategy = st.tuples(
    st.integers(0, len(USERS) - 1),
    st.integers(0, len(THREADS) - 1),
    st.integers(0, len(MESSAGES) - 1),
    st.integers(0, len(VOICES) - 1),
    st.integers(0, 2),
    st.booleans(),
    st.integers(0, 3),
)


def text_for(message: str, variant: int) -> str:
    """Texts shared across users and threads: only the key can keep their audio apart."""
    return f"message {message}, version {variant}"


def expected(user: str, thread: str, message: str, voice: str, variant: int) -> bytes:
    """The audio the fake makes for exactly this (user, thread, message, voice, text)."""
    salt = FakeLegacyBackend.request_salt(user, thread, message, voice)
    return FakeLegacyBackend.audio_for(text_for(message, variant), salt, SIZE)


async def run_scenario(requests: list[tuple[int, int, int, int, int, bool, int]]) -> None:
    backend = FakeLegacyBackend()
    backend.speak.chunks = 4
    backend.speak.size = SIZE
    backend.speak.per_request = True
    await backend.start()
    with tempfile.TemporaryDirectory() as folder:
        app_settings = settings_for(Path(folder), backend.url)
        server = aiohttp.test_utils.TestServer(create_app(app_settings))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                for wave in range(4):
                    batch = [r for r in requests if r[6] == wave]
                    await asyncio.gather(*(check_one(session, server, r) for r in batch))
                    await settle(server.app)
        finally:
            await server.close()
            await backend.stop()


async def check_one(
    session: aiohttp.ClientSession,
    server: aiohttp.test_utils.TestServer,
    request: tuple[int, int, int, int, int, bool, int],
) -> None:
    user_i, thread_i, message_i, voice_i, variant, identified, _ = request
    user, thread, message = USERS[user_i], THREADS[thread_i], MESSAGES[message_i]
    voice = VOICES[voice_i]
    text = text_for(message, variant)
    payload: dict[str, Any] = {
        "text": text,
        "voice": voice,
        "message_id": message,
        "thread_id": thread,
        "save_to_volume": True,
    }
    headers = {"X-Forwarded-Email": user} if identified else {}
    async with session.post(server.make_url("/api/tts/speak"), json=payload, headers=headers) as r:
        data = await r.read()
        assert r.status == 200
        assert r.headers["X-TTS-Cache"] in ({"hit", "miss"} if identified else {"disabled"})
    # Without an identity the backend made it for nobody in particular.
    assert data == expected(user if identified else "", thread, message, voice, variant)
    if identified:
        async with session.get(
            server.make_url(f"/_proxy/audio/{thread}/{message}/{voice}"), headers=headers
        ) as r:
            audio = await r.read()
        # The audio URL serves this user's latest recording of that message in that voice, or
        # nothing yet: never another user's.
        if r.status == 200:
            assert any(audio == expected(user, thread, message, voice, v) for v in range(3))
        else:
            assert r.status == 404


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(st.lists(request_strategy, min_size=1, max_size=24))
def test_no_response_carries_another_requests_audio(
    requests: list[tuple[int, int, int, int, int, bool, int]],
) -> None:
    asyncio.run(run_scenario(requests))
