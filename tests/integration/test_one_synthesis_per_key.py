"""One synthesis per key in one process, whatever memory evicts and however slow the Volume."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.speak import CacheKey
from proxy.state import CACHE
from proxy.storage.entry import Entry
from proxy.storage.local import LocalVolume
from tests.conftest import MakeProxyClient
from tests.fakes import FakeLegacyBackend
from tests.support import SPEAK, settle, speak_body

RECORDING_BYTES = 48 * 1024
USERS = [f"user-{n}@example.com" for n in range(4)]
THREADS = ["t-1", "t-2", "t-3"]
MESSAGES = [f"m-{n}" for n in range(8)]
# 96 keys of 48 KiB: 4.5 MiB of recordings for a 2 MiB memory tier.
KEYS = [(user, thread, message) for user in USERS for thread in THREADS for message in MESSAGES]


def text_of(user: str, thread: str, message: str) -> str:
    return f"words of {message} in {thread} for {user}"


def expected_audio(user: str, thread: str, message: str) -> bytes:
    return FakeLegacyBackend.audio_for(text_of(user, thread, message), "af_nicole", RECORDING_BYTES)


def syntheses(backend: FakeLegacyBackend) -> Counter[tuple[str, ...]]:
    """Backend speak calls per unique (user, thread, message, voice, text)."""
    return Counter(
        (
            headers.get("X-Forwarded-Email", ""),
            str(body.get("thread_id")),
            str(body.get("message_id")),
            str(body.get("voice")),
            str(body.get("text")),
        )
        for body, headers in zip(backend.speak_bodies, backend.speak_headers, strict=True)
    )


def slow_volume_writes(monkeypatch: pytest.MonkeyPatch, *, at_once: int, seconds: float) -> None:
    """A Volume that writes `at_once` entries at a time, each taking `seconds` more."""
    original: Callable[[LocalVolume, CacheKey, Entry], Awaitable[None]] = LocalVolume.put
    gate = asyncio.Semaphore(at_once)

    async def put(self: LocalVolume, key: CacheKey, entry: Entry) -> None:
        async with gate:
            await asyncio.sleep(seconds)
            await original(self, key, entry)

    monkeypatch.setattr(LocalVolume, "put", put)


async def ask(client: Any, key: tuple[str, str, str], outcomes: Counter[str]) -> None:
    user, thread, message = key
    payload = speak_body(text=text_of(*key), thread_id=thread, message_id=message)
    async with client.post(SPEAK, json=payload, headers={"X-Forwarded-Email": user}) as response:
        body = await response.read()
        assert response.status == 200
        assert body == expected_audio(*key)
        outcomes[response.headers["X-TTS-Cache"]] += 1


async def test_a_burst_then_a_stream_larger_than_memory_costs_one_synthesis_per_key(
    make_proxy_client: MakeProxyClient,
    legacy_backend: FakeLegacyBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    legacy_backend.speak.size = RECORDING_BYTES
    # Two writes at a time, 30 ms each: the 96 writes take about 1.5 s after the burst.
    slow_volume_writes(monkeypatch, at_once=2, seconds=0.03)
    client = await make_proxy_client(**{"cache.memory.max_bytes": 2 * 1024 * 1024})
    outcomes: Counter[str] = Counter()

    # The burst: every key asked three times at once.
    await asyncio.gather(*(ask(client, key, outcomes) for key in KEYS for _ in range(3)))
    assert client.app[CACHE].pending_writes > 0  # the Volume is still behind

    # The stream: 16 clients asking keys at random for 2 seconds, while memory evicts.
    chooser = random.Random(14)
    deadline = time.monotonic() + 2.0

    async def stream() -> None:
        while time.monotonic() < deadline:
            await ask(client, chooser.choice(KEYS), outcomes)

    await asyncio.gather(*(stream() for _ in range(16)))
    await settle(client.app)
    counts = syntheses(legacy_backend)
    twice = {key: n for key, n in counts.items() if n != 1}
    assert twice == {}, f"{len(twice)} keys synthesized more than once"
    assert len(counts) == len(KEYS)
    assert set(outcomes) == {"miss", "hit"}
    assert outcomes["miss"] >= len(KEYS) and outcomes["hit"] > 100


def slow_volume_answers(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """A Volume whose lookups answer `seconds` after they read (a slow network's reply)."""
    original: Callable[[LocalVolume, CacheKey], Awaitable[Entry | None]] = LocalVolume.open

    async def open_late(self: LocalVolume, key: CacheKey) -> Entry | None:
        found = await original(self, key)
        await asyncio.sleep(seconds)
        return found

    monkeypatch.setattr(LocalVolume, "open", open_late)


@pytest.mark.parametrize("memory_bytes", [0, 2 * 1024 * 1024])
async def test_a_fill_that_ends_during_a_slow_lookup_serves_the_request_that_looked(
    make_proxy_client: MakeProxyClient,
    legacy_backend: FakeLegacyBackend,
    monkeypatch: pytest.MonkeyPatch,
    memory_bytes: int,
) -> None:
    slow_volume_answers(monkeypatch, 0.3)
    client = await make_proxy_client(**{"cache.memory.max_bytes": memory_bytes})
    outcomes: Counter[str] = Counter()
    key = KEYS[0]
    legacy_backend.speak.size = RECORDING_BYTES

    async def later() -> None:
        # Asks while the first request's lookup is still out: no fill to join yet; the first
        # request's fill then starts, ends and is written while this one's lookup is out.
        await asyncio.sleep(0.1)
        await ask(client, key, outcomes)

    await asyncio.gather(ask(client, key, outcomes), later())
    assert legacy_backend.calls[SPEAK] == 1
    assert outcomes == {"miss": 1, "hit": 1}
