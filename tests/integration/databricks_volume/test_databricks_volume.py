"""DatabricksVolume on the Files API emulator: storage, integrity, the breaker, readiness."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import aiohttp
import pytest

from proxy.speak import CacheKey
from proxy.storage.databricks.files_api import VolumeUnavailable
from proxy.storage.databricks.streamed import CorruptEntry, StreamedEntry
from proxy.storage.databricks.volume import DatabricksVolume
from proxy.storage.tiered import TieredCache
from tests.databricks_volume_support import (
    FOLDER,
    KEY,
    OBJECT,
    PAT,
    SIDECAR,
    VOLUME,
    MakeVolume,
    as_user,
    audio,
    entry_for,
    settings,
)
from tests.fakes.files_api import FilesApiEmulator


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


# Storage


async def test_put_then_get_round_trip_in_the_documented_layout(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    await volume.put(KEY, entry)

    assert emulator.read(OBJECT) == entry.body
    raw_sidecar = emulator.read(SIDECAR)
    assert raw_sidecar is not None
    sidecar = json.loads(raw_sidecar)
    assert sidecar["object"] == "af_nicole.mp3"
    assert sidecar["key"] == {
        "user": KEY.user,
        "thread_id": KEY.thread_id,
        "message_id": KEY.message_id,
        "voice": KEY.voice,
    }
    assert sidecar["body_sha256"] == entry.meta.body_sha256
    # Object first, sidecar last.
    puts = [r.path for r in emulator.requests if r.method == "PUT"]
    assert puts == [OBJECT, SIDECAR]
    assert emulator.tokens_used(VOLUME) == {PAT}
    assert {r.workspace_id for r in emulator.requests if r.endpoint == "files"} == {
        emulator.workspace_id
    }

    got = await volume.get(KEY)
    assert got == entry
    assert volume.breaker_state == "closed"


async def test_a_new_instance_finds_the_entry(make_volume: MakeVolume) -> None:
    entry = entry_for(audio(seed="restart"))
    first = make_volume()
    await first.put(KEY, entry)
    await first.aclose()

    second = make_volume()
    assert await second.get(KEY) == entry


async def test_a_miss_is_none_and_not_a_failure(make_volume: MakeVolume) -> None:
    volume = make_volume(settings={"failure_threshold": 1})
    for _ in range(3):
        assert await volume.get(KEY) is None
        assert await volume.open(KEY) is None
    await volume.delete(KEY)
    assert volume.breaker_state == "closed"
    assert volume.breaker.consecutive_failures == 0


async def test_a_put_is_two_calls_and_the_orphan_walk_removes_an_old_format(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio(), "audio/mpeg"))
    wav = entry_for(audio(seed="wav"), "audio/wav")
    calls = sum(emulator.calls.values())
    await volume.put(KEY, wav)
    # The object, then its sidecar: no listing to look for a recording in another format.
    assert sum(emulator.calls.values()) - calls == 2
    assert emulator.read(f"{FOLDER}/af_nicole.wav") == wav.body
    assert await volume.get(KEY) == wav  # the sidecar names the new object
    assert emulator.read(OBJECT) is not None

    # The superseded object goes with the orphan walk once old enough, never the named one.
    assert await volume.clean_orphans(limit=10, older_than=time.time() - 60) == 0
    assert emulator.read(OBJECT) is not None
    assert await volume.clean_orphans(limit=10, older_than=time.time() + 60) == 1
    assert emulator.read(OBJECT) is None
    assert await volume.get(KEY) == wav

    await volume.delete(KEY)
    assert emulator.read(f"{FOLDER}/af_nicole.wav") is None
    assert emulator.read(SIDECAR) is None
    assert await volume.get(KEY) is None


async def test_streamed_open_starts_before_the_whole_object_arrived(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    # Past verify_max_bytes a hit streams; up to it, it is checked whole first.
    volume = make_volume(chunk_size=16 * 1024, settings={"verify_max_bytes": 128 * 1024})
    entry = entry_for(audio(256 * 1024))
    await volume.put(KEY, entry)
    emulator.chunk_delay = 0.04  # 16 chunks of 16 KiB: about 0.6 s for the whole object

    streamed = await volume.open(KEY)
    assert streamed is not None
    assert streamed.meta == entry.meta
    arrivals: list[float] = []
    chunks: list[bytes] = []
    try:
        async for chunk in streamed:
            arrivals.append(time.monotonic())
            chunks.append(chunk)
    finally:
        await streamed.aclose()

    assert b"".join(chunks) == entry.body
    assert len(chunks) > 4
    # The first chunk was in hand long before the last one had been sent.
    assert arrivals[-1] - arrivals[0] >= 0.3


async def test_range_on_a_stored_object(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    entry = entry_for(audio())
    await make_volume().put(KEY, entry)
    url = f"{emulator.url}/api/2.0/fs/files{OBJECT.replace('@', '%40').replace('+', '%2B')}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, headers={"Authorization": f"Bearer {PAT}", "Range": "bytes=1000-1999"}
        ) as response,
    ):
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-1999/{len(entry.body)}"
        assert await response.read() == entry.body[1000:2000]


async def test_read_meta_reads_the_sidecar_alone_and_removes_nothing(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    assert await volume.read_meta(KEY) is None
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.corrupt(OBJECT)
    sidecar_reads, reads = emulator.count("GET", "files", ".json"), emulator.count("GET", "files")

    # The sidecar alone: the corrupt object is neither read nor removed.
    assert await volume.read_meta(KEY) == entry.meta
    assert emulator.count("GET", "files", ".json") == sidecar_reads + 1
    assert emulator.count("GET", "files") == reads + 1
    assert emulator.read(OBJECT) is not None
    # A malformed sidecar is None, and kept for a reader that removes it.
    emulator.write(SIDECAR, b"{not json")
    assert await volume.read_meta(KEY) is None
    assert emulator.read(SIDECAR) == b"{not json"
    assert emulator.read(OBJECT) is not None


async def test_the_durable_tier_surface(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    user = make_volume(settings={"auth": "user"})
    assert volume.kind == "databricks"
    assert (volume.walkable, user.walkable) == (True, False)
    assert volume.describe() == "Databricks, breaker closed"
    await volume.put(KEY, entry_for(audio()))
    calls = len(emulator.requests)
    # The Files API keeps no access times and uploads leave no temporary files.
    assert volume.get_nowait(KEY) is None
    assert await volume.record_hits({KEY: time.time()}) is False
    assert await volume.clean_leftovers() == 0
    # Without a user's token nothing is asked: a metadata read is a miss.
    assert await user.read_meta(KEY) is None
    assert len(emulator.requests) == calls


# Integrity


async def test_a_corrupt_object_is_a_miss_and_both_files_go(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio()))
    emulator.corrupt(OBJECT)
    assert await volume.get(KEY) is None
    await volume.settle()  # the removal runs behind the answer
    assert emulator.read(OBJECT) is None
    assert emulator.read(SIDECAR) is None
    assert volume.breaker_state == "closed"
    assert volume.corrupt_entries == 1


async def test_a_hit_within_the_bound_is_checked_whole_before_open_answers(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()  # verify_max_bytes: 16 MiB by default
    entry = entry_for(audio(256 * 1024))
    await volume.put(KEY, entry)
    assert await volume.open(KEY) == entry  # a whole Entry, not a stream
    emulator.corrupt(OBJECT)
    reads = emulator.count("GET", "files", ".mp3")
    assert await volume.open(KEY) is None  # not one byte to send: a miss
    assert emulator.count("GET", "files", ".mp3") == reads + 1
    assert volume.corrupt_entries == 1
    assert volume.breaker.consecutive_failures == 0  # the Volume answered; the object is bad
    await volume.settle()
    assert emulator.read(OBJECT) is None and emulator.read(SIDECAR) is None


async def test_an_object_of_the_wrong_length_is_a_miss(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    entry = entry_for(audio())
    for reader in (volume.get, volume.open):
        await volume.put(KEY, entry)
        emulator.write(OBJECT, entry.body[:-100])
        assert await reader(KEY) is None
        await volume.settle()
        assert emulator.read(OBJECT) is None
        assert emulator.read(SIDECAR) is None


async def test_a_malformed_sidecar_is_a_miss_and_removed(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio()))
    emulator.write(SIDECAR, b"{not json")
    assert await volume.get(KEY) is None
    await volume.settle()
    assert emulator.read(SIDECAR) is None
    assert emulator.read(OBJECT) is None


async def test_a_sidecar_naming_another_key_is_refused(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    await volume.put(KEY, entry_for(audio()))
    raw = emulator.read(SIDECAR)
    assert raw is not None
    tampered = json.loads(raw)
    tampered["key"]["user"] = "mallory"
    emulator.write(SIDECAR, json.dumps(tampered).encode())
    assert await volume.get(KEY) is None


async def test_streamed_open_withholds_the_final_chunk_of_a_corrupt_object(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(chunk_size=16 * 1024, settings={"verify_max_bytes": 64 * 1024})
    entry = entry_for(audio(128 * 1024))
    await volume.put(KEY, entry)
    emulator.corrupt(OBJECT)

    streamed = await volume.open(KEY)
    assert isinstance(streamed, StreamedEntry)
    received = bytearray()
    with pytest.raises(CorruptEntry):
        async for chunk in streamed:
            received.extend(chunk)
    await streamed.aclose()

    assert len(received) < len(entry.body)
    assert len(received) >= len(entry.body) - 16 * 1024
    await volume.settle()
    assert volume.corrupt_entries == 1
    assert emulator.read(OBJECT) is None
    assert emulator.read(SIDECAR) is None


# Breaker


async def test_breaker_opens_after_threshold_and_closes_after_cooldown(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    clock = FakeClock()
    volume = make_volume(
        clock=clock,
        settings={"retries": 0, "failure_threshold": 2, "cooldown_seconds": 30.0},
    )
    entry = entry_for(audio())
    await volume.put(KEY, entry)
    emulator.fail_next(100, status=500)

    for _ in range(2):
        with pytest.raises(VolumeUnavailable):
            await volume.get(KEY)
    assert volume.breaker_state == "open"
    calls = len(emulator.requests)
    for _ in range(5):
        with pytest.raises(VolumeUnavailable, match="circuit breaker"):
            await volume.get(KEY)
    assert len(emulator.requests) == calls

    # After the cooldown a failing trial reopens it...
    clock.now += 30.0
    with pytest.raises(VolumeUnavailable):
        await volume.get(KEY)
    assert volume.breaker_state == "open"
    assert len(emulator.requests) == calls + 1

    # ...and a succeeding one closes it.
    emulator.clear_faults()
    clock.now += 30.0
    assert await volume.get(KEY) == entry
    assert volume.breaker_state == "closed"


async def test_tiered_cache_keeps_answering_while_the_breaker_is_open(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume(settings={"retries": 0, "failure_threshold": 1})
    emulator.fail_next(1, status=503)
    cache = TieredCache(None, volume, timeout_seconds=5.0, logger=logging.getLogger("test"))
    assert await cache.get(KEY) is None
    assert volume.breaker_state == "open"
    started = time.monotonic()
    for _ in range(20):
        assert await cache.get(KEY) is None
    assert time.monotonic() - started < 0.5
    assert cache.errors["volume"] == 21
    assert await volume.ping() is False


# Readiness, settings, keys


async def test_ping(emulator: FilesApiEmulator, make_volume: MakeVolume) -> None:
    assert await make_volume().ping() is True
    assert await make_volume(settings={"path": "/Volumes/main/default/missing"}).ping() is False
    assert await make_volume(config_options={"token": "dapi-wrong"}).ping() is False
    user = make_volume(settings={"auth": "user"})
    assert await user.ping() is True
    emulator.add_token("tok-alice")
    assert await as_user("tok-alice", user.ping) is True


@pytest.mark.parametrize(
    "overrides",
    [{"path": "var/volume"}, {"path": "/Volumes/main/default"}, {"prefix": "../x"}],
)
def test_bad_settings_are_refused(overrides: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        DatabricksVolume(settings(**overrides), host="https://example.invalid")


async def test_invalid_keys_are_refused(make_volume: MakeVolume) -> None:
    volume = make_volume()
    with pytest.raises(ValueError):
        await volume.get(CacheKey("../alice", "t", "m", "v"))
    with pytest.raises(ValueError):
        await volume.put(KEY, dataclasses.replace(entry_for(b"abc"), body=b"abd"))


async def test_lookups_past_the_call_budget_go_upstream_at_once_and_spare_the_breaker(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    # One call at a time, two a second, a lookup answered within 300 ms, each call 200 ms.
    volume = make_volume(
        settings={
            "max_concurrent_calls": 1,
            "max_calls_per_second": 2.0,
            "lookup_budget_ms": 300,
            "failure_threshold": 1,
        }
    )
    cache = TieredCache(None, volume, timeout_seconds=5.0, logger=logging.getLogger("test"))
    assert await volume.read_meta(KEY) is None  # credentials resolved (no lookup budget)
    emulator.latency = 0.2
    keys = [KEY._replace(message_id=f"m{n}") for n in range(8)]
    started = time.monotonic()
    answers = await asyncio.gather(*(cache.get(key) for key in keys))
    elapsed = time.monotonic() - started

    assert answers == [None] * 8  # every lookup a miss: nothing stored
    assert cache.errors["volume_busy"] >= 5  # those the budget could not start in time
    assert cache.errors["volume"] == 0  # none of it is the Volume's fault...
    assert volume.breaker_state == "closed"  # ...so the breaker stays closed
    assert elapsed < 1.0  # nobody waited past their lookup's budget (plus one call)
    assert emulator.count("GET", "files") <= 3  # the budget's calls: the refused made none
