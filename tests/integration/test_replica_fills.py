"""One synthesis per key across replicas: two proxies on one PostgreSQL and one Volume (in one
test process), the fake backend counting its speak calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multidict import CIMultiDict

from proxy.app import create_app
from proxy.state import STATS
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend, SpeakBehaviour
from tests.support import SPEAK, Spoken, speak, speak_body

AUDIO = FakeLegacyBackend.audio_for("Hello there", "af_nicole")


async def replica(
    aiohttp_client: Any, backend: FakeLegacyBackend, tmp_path: Path, dsn: str, **settings: Any
) -> Any:
    values = {"index.dsn": dsn, "index.timeout_seconds": 1.0, **settings}
    return await aiohttp_client(create_app(settings_for(tmp_path, backend.url, **values)))


def by_call(*behaviours: SpeakBehaviour) -> Callable[..., SpeakBehaviour]:
    """A speak plan: the Nth backend call behaves as the Nth behaviour (the last one after)."""
    calls = 0

    def plan(_body: dict[str, Any], _headers: CIMultiDict[str]) -> SpeakBehaviour:
        nonlocal calls
        calls += 1
        return behaviours[min(calls, len(behaviours)) - 1]

    return plan


async def leading(client: Any, backend: FakeLegacyBackend) -> asyncio.Task[Spoken]:
    """A speak call on `client` that has reached the backend."""
    task = asyncio.create_task(speak(client, SPEAK, speak_body()))
    for _ in range(300):
        if backend.calls[SPEAK] == 1:
            return task
        await asyncio.sleep(0.01)
    raise AssertionError("the leader never reached the backend")


def outcomes(client: Any) -> dict[str, int]:
    return dict(client.app[STATS].fleet_fills)


async def test_a_replica_missing_a_key_another_fills_serves_its_recording_from_the_volume(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    first = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    second = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn)
    legacy_backend.speak.headers_delay = 0.5
    leader = await leading(first, legacy_backend)

    followed = await speak(second, SPEAK, speak_body())

    assert followed.status == 200 and followed.body == AUDIO and (await leader).body == AUDIO
    assert legacy_backend.calls[SPEAK] == 1
    assert followed.cache == "miss"
    assert outcomes(first) == {"lease": 1} and outcomes(second) == {"followed": 1}
    # The follower kept a copy in its memory; the recording was written once, by the leader.
    assert (await speak(second, SPEAK, speak_body())).tier == "memory"
    assert legacy_backend.calls[SPEAK] == 1


async def test_a_leader_that_gets_no_recording_frees_its_followers_at_once(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    bound = {"fleet.wait_seconds": 30.0}
    first = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **bound)
    second = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **bound)
    legacy_backend.speak_plan = by_call(
        SpeakBehaviour(status=500, headers_delay=0.3), SpeakBehaviour()
    )
    leader = await leading(first, legacy_backend)

    started = time.monotonic()
    followed = await speak(second, SPEAK, speak_body())

    assert (await leader).status == 500  # the backend's answer to the leader's client
    assert followed.status == 200 and followed.body == AUDIO
    assert time.monotonic() - started < 10  # the lease came back: no wait for the bound
    assert legacy_backend.calls[SPEAK] == 2
    assert outcomes(second) == {"takeover": 1}


async def test_a_follower_fills_the_key_itself_once_its_wait_is_over(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    bound = {"fleet.wait_seconds": 0.5}
    first = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **bound)
    second = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **bound)
    legacy_backend.speak_plan = by_call(SpeakBehaviour(headers_delay=3.0), SpeakBehaviour())
    leader = await leading(first, legacy_backend)

    followed = await speak(second, SPEAK, speak_body())

    assert followed.status == 200 and followed.body == AUDIO
    assert not leader.done()  # the leader is still synthesizing
    assert legacy_backend.calls[SPEAK] == 2
    assert outcomes(second) == {"wait_timeout": 1}
    assert (await leader).body == AUDIO


async def test_with_replica_fills_off_each_replica_synthesizes_its_own(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, postgres_dsn: str
) -> None:
    off = {"fleet.replica_fills": False}
    first = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **off)
    second = await replica(aiohttp_client, legacy_backend, tmp_path, postgres_dsn, **off)
    legacy_backend.speak.headers_delay = 0.3
    leader = await leading(first, legacy_backend)

    assert (await speak(second, SPEAK, speak_body())).body == AUDIO
    assert (await leader).body == AUDIO
    assert legacy_backend.calls[SPEAK] == 2
    assert outcomes(first) == outcomes(second) == {}
