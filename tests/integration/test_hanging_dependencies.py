"""A hung local Volume or PostgreSQL costs a bounded wait on a few requests, then nothing."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.speak import CacheKey
from proxy.state import CACHE, INDEX, VOLUME
from proxy.storage.entry import Entry
from proxy.storage.local import LocalVolume
from proxy.storage.local.commit import Publish
from tests.conftest import MakeProxyClient
from tests.fakes import FakeLegacyBackend
from tests.pg import ChatMessage, PostgresServer, create_chat_messages
from tests.support import ALICE, SPEAK, settle, speak_body


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Set when the test ends: what a stalled disk's threads wait for."""
    event = threading.Event()
    try:
        yield event
    finally:
        event.set()


def stall_reads(monkeypatch: pytest.MonkeyPatch, released: threading.Event) -> None:
    """The local Volume's reads block in their threads (a hung mount) until `released`."""

    def read(self: LocalVolume, key: CacheKey) -> Entry | None:
        released.wait()
        return None

    monkeypatch.setattr(LocalVolume, "_get_sync", read)


def stall_writes(monkeypatch: pytest.MonkeyPatch, released: threading.Event) -> None:
    """The local Volume's writes block in their thread until `released`, then fail."""

    def stage(self: LocalVolume, key: CacheKey, entry: Entry) -> Publish:
        released.wait()
        raise OSError(errno.EIO, "the hung mount never came back")

    monkeypatch.setattr(LocalVolume, "_stage", stage)


async def timed_speak(client: Any, message_id: str) -> tuple[float, str]:
    started = time.monotonic()
    async with client.post(SPEAK, json=speak_body(message_id=message_id), headers=ALICE) as r:
        body = await r.read()
        assert r.status == 200
        assert body == FakeLegacyBackend.audio_for("Hello there", "af_nicole")
        return time.monotonic() - started, r.headers["X-TTS-Cache"]


async def test_a_hung_local_volume_costs_the_budget_on_a_few_requests_then_nothing(
    make_proxy_client: MakeProxyClient,
    monkeypatch: pytest.MonkeyPatch,
    released: threading.Event,
) -> None:
    stall_reads(monkeypatch, released)
    stall_writes(monkeypatch, released)
    client = await make_proxy_client(
        **{
            "cache.volume.failure_threshold": 3,  # lookup_budget_ms: 500, timeout_seconds: 10
            "cache.min_uses": 1_000,  # nothing is stored: only lookups reach the Volume
        }
    )
    answers = [await timed_speak(client, f"m-{n}") for n in range(6)]
    took = [seconds for seconds, _ in answers]
    assert {cache for _, cache in answers} == {"miss"}
    assert all(0.45 <= seconds < 1.5 for seconds in took[:3]), took
    assert all(seconds < 0.3 for seconds in took[3:]), took
    assert client.app[VOLUME].breaker_state == "open"
    assert client.app[CACHE].errors["volume"] == 6  # three timeouts, three skips
    async with client.get("/_proxy/ready") as response:
        assert response.status == 503
        assert (await response.json())["checks"]["volume"] == "breaker-open"


async def test_a_hung_local_write_is_abandoned_at_the_timeout_and_counted(
    make_proxy_client: MakeProxyClient,
    monkeypatch: pytest.MonkeyPatch,
    released: threading.Event,
) -> None:
    stall_writes(monkeypatch, released)
    client = await make_proxy_client(
        **{"cache.volume.timeout_seconds": 0.5, "cache.volume.failure_threshold": 1}
    )
    took, cache = await timed_speak(client, "m-1")
    assert cache == "miss" and took < 0.3  # no client waits for a write
    started = time.monotonic()
    await settle(client.app)
    assert 0.4 <= time.monotonic() - started < 1.0  # the write gave up at its timeout
    assert client.app[CACHE].errors["volume"] == 1
    assert client.app[VOLUME].breaker_state == "open"
    # The entry stayed in memory all along: the next request is a hit.
    assert (await timed_speak(client, "m-1"))[1] == "hit"


async def test_a_hung_postgresql_costs_its_timeout_once_then_nothing(
    make_proxy_client: MakeProxyClient,
    legacy_backend: FakeLegacyBackend,
    postgres_dsn: str,
    postgres_server: PostgresServer,
) -> None:
    if not postgres_server.owned:
        pytest.skip("pausing needs the cluster this session started")
    await create_chat_messages(
        postgres_dsn, [ChatMessage(f"m-{n}", "alice@example.com", "t-1") for n in range(8)]
    )
    client = await make_proxy_client(
        **{
            "index.dsn": postgres_dsn,
            "index.timeout_seconds": 0.5,
            "index.verify_ownership": True,
            "index.ownership_cache_seconds": 0,  # every request asks PostgreSQL
        }
    )
    assert (await timed_speak(client, "m-0"))[1] == "miss"
    await asyncio.to_thread(postgres_server.pause)
    try:
        answers = [await timed_speak(client, f"m-{n}") for n in range(1, 6)]
    finally:
        await asyncio.to_thread(postgres_server.resume)
    took = [seconds for seconds, _ in answers]
    # Unverifiable ownership fails closed: answered by the backend, nothing cached.
    assert {cache for _, cache in answers} == {"disabled"}
    assert 0.45 <= took[0] < 1.5, took
    assert all(seconds < 0.3 for seconds in took[1:]), took
    assert client.app[INDEX].available is False
