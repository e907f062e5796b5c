"""The Files API client on the emulator: retries, Retry-After, deadlines, bodies cut short."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from proxy.storage.databricks.files_api import VolumeRequestFailed, VolumeUnavailable
from proxy.storage.tiered import TieredCache
from tests.databricks_volume_support import (
    KEY,
    OBJECT,
    SIDECAR,
    MakeVolume,
    audio,
    collect,
    entry_for,
)
from tests.fakes.files_api import FilesApiEmulator

# Faults


async def test_500s_then_success_are_retried(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    emulator.fail_next(2, status=500, method="PUT")
    await volume.put(KEY, entry)
    assert emulator.count("PUT", "files", ".mp3") == 3

    emulator.fail_next(2, status=503, path_suffix=".mp3")
    assert await volume.get(KEY) == entry
    assert volume.breaker_state == "closed"


async def test_retries_run_out(emulator: FilesApiEmulator, make_volume: MakeVolume) -> None:
    volume = make_volume(settings={"retries": 1})
    emulator.fail_next(10, status=502)
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert emulator.count("GET", "files") == 2


async def test_a_client_error_is_not_retried(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    emulator.fail_next(1, status=400)
    with pytest.raises(VolumeRequestFailed) as raised:
        await volume.get(KEY)
    assert raised.value.status == 400
    assert emulator.count("GET", "files") == 1


async def test_429_retry_after_is_honoured(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    # A lookup waits for a Retry-After only within its budget (here 1.5 s; 0.5 s by default).
    volume = make_volume(settings={"lookup_budget_ms": 1_500})
    entry = entry_for(audio())
    emulator.throttle_next(1, retry_after=1, method="PUT", path_suffix=".json")
    started = time.monotonic()
    await volume.put(KEY, entry)
    assert time.monotonic() - started >= 1.0
    assert emulator.count("PUT", "files", ".json") == 2
    emulator.throttle_next(1, retry_after=1, path_suffix=".json")
    started = time.monotonic()
    assert await volume.get(KEY) == entry
    assert time.monotonic() - started >= 1.0
    assert emulator.count("GET", "files", ".json") == 2


async def test_a_lookup_does_not_wait_for_a_retry_after_past_its_budget(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 5.0})  # the budget: 0.5 s by default
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.throttle_next(1, retry_after=1, path_suffix=".json")
    started = time.monotonic()
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert time.monotonic() - started < 0.5
    assert volume.breaker.consecutive_failures == 1


async def test_a_retry_after_past_the_budget_is_not_waited_for(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 2.0})
    emulator.throttle_next(1, retry_after=30)
    started = time.monotonic()
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert time.monotonic() - started < 1.0
    assert emulator.count("GET", "files") == 1


async def test_a_body_cut_short_is_retried_or_missed_never_served(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    entry = entry_for(audio())
    volume = make_volume()
    await volume.put(KEY, entry)

    # One cut: the retry reads the whole object.
    emulator.cut_next(1, path_suffix=".mp3")
    assert await volume.get(KEY) == entry

    # Cut every time: a miss for the user, and the stored entry is left alone.
    no_retries = make_volume(settings={"retries": 0})
    emulator.cut_next(1, path_suffix=".mp3")
    cache = TieredCache(None, no_retries, timeout_seconds=5.0, logger=logging.getLogger("test"))
    assert await cache.get(KEY) is None
    assert cache.errors["volume"] == 1
    assert emulator.read(OBJECT) == entry.body
    assert await cache.get(KEY) is not None

    # A hit checked before it is sent: the cut is retried like any other read.
    emulator.cut_next(1, path_suffix=".mp3")
    assert await volume.open(KEY) == entry

    # Streamed (past verify_max_bytes): the cut surfaces as an unavailable Volume, not as
    # corruption.
    streaming = make_volume(settings={"verify_max_bytes": 1024})
    streamed = await streaming.open(KEY)
    assert streamed is not None
    emulator.cut_next(1, path_suffix=".mp3")
    streamed_again = await streaming.open(KEY)
    assert streamed_again is not None
    with pytest.raises(VolumeUnavailable):
        await collect(streamed_again)
    assert await collect(streamed) == entry.body
    assert emulator.read(SIDECAR) is not None


async def test_a_hang_raises_within_the_timeout(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 0.5})
    emulator.hang_next(1)
    started = time.monotonic()
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert time.monotonic() - started < 0.5 + 0.3

    emulator.hang_next(1, method="PUT")
    cache = TieredCache(None, volume, timeout_seconds=5.0, logger=logging.getLogger("test"))
    started = time.monotonic()
    cache.put(KEY, entry_for(audio()))
    await cache.drain()
    assert time.monotonic() - started < 0.5 + 0.3
    assert cache.errors["volume"] == 1


async def test_added_latency_stays_within_budget(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"timeout_seconds": 1.0})
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.latency = 0.1
    assert await volume.get(KEY) == entry
    emulator.latency = 0.6  # two calls per get: the second runs out of budget
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)


# The process's share of the workspace's budget


async def test_calls_never_exceed_the_configured_concurrency(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"max_concurrent_calls": 2, "lookup_budget_ms": 5_000})
    emulator.latency = 0.05
    keys = [KEY._replace(message_id=f"m-{n}") for n in range(12)]

    found = await asyncio.gather(*(volume.get(key) for key in keys))

    assert found == [None] * 12
    assert emulator.max_in_flight == 2
    stats = volume.call_stats()
    assert stats.calls[("GET", "404")] == 12
    assert stats.wait_seconds > 0.1  # ten of them waited for a slot


async def test_a_429_slows_every_call_of_the_process(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"lookup_budget_ms": 5_000})
    emulator.throttle_next(1, retry_after=1, path_suffix="m-0/af_nicole.meta.json")
    first = asyncio.create_task(volume.get(KEY._replace(message_id="m-0")))
    await asyncio.sleep(0.2)  # the 429 has come back: the whole process waits out its Retry-After
    started = time.monotonic()
    assert await volume.get(KEY._replace(message_id="m-1")) is None
    assert time.monotonic() - started >= 0.6
    assert await first is None
    assert volume.call_stats().calls[("GET", "429")] == 1
