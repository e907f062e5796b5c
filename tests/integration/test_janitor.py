"""The janitor on real parts: files under tmp_path, a real PostgreSQL, the Files API emulator."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.config import CacheSettings, VolumeSettings
from proxy.index.entries import PostgresIndex
from proxy.janitor import Janitor, JanitorReport
from proxy.speak import CacheKey
from proxy.storage.databricks import DatabricksVolume
from proxy.storage.entry import Entry
from proxy.storage.local import LocalVolume
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import TieredCache
from tests.fakes.files_api import FilesApiEmulator

LOGGER = logging.getLogger("test.janitor")
ALICE = "alice@example.com"
BOB = "bob@example.com"
SIZE = 1000
# Older than the janitor's default grace period for leftovers (900 s).
LONG_AGO = 3600.0
PAT = "dapi-app-token"
DATABRICKS_ROOT = "/Volumes/main/default/tts"
DATABRICKS_BASE = f"{DATABRICKS_ROOT}/tts_audio"


class Clock:
    """A wall clock the test moves by hand, starting at the real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def key(n: int, user: str = ALICE) -> CacheKey:
    return CacheKey(user, "t-1", f"m-{n}", "af_nicole")


def entry(seed: str, size: int = SIZE, created_at: float | None = None) -> Entry:
    body = (hashlib.sha256(seed.encode()).digest() * (size // 32 + 1))[:size]
    return Entry.build(
        body,
        content_type="audio/mpeg",
        text_sha256="ab" * 32,
        provider="replicate",
        created_at=created_at,
    )


def settings(batch: int = 500, **volume: Any) -> CacheSettings:
    return CacheSettings(
        janitor_batch_size=batch,
        janitor_interval_seconds=volume.pop("interval", 300.0),
        volume=VolumeSettings(**volume),
    )


def backdate(path: Path, when: float) -> None:
    os.utime(path, (when, when))


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@dataclass
class Harness:
    """A LocalVolume behind a TieredCache, with or without an index, and a janitor factory."""

    root: Path
    volume: LocalVolume
    cache: TieredCache
    index: PostgresIndex | None
    clock: Clock

    def janitor(self, batch: int = 500, **volume: Any) -> Janitor:
        volume.setdefault("path", str(self.root))
        return Janitor(
            settings(batch, **volume), self.cache, self.volume, self.index, clock=self.clock
        )

    def folder(self, key: CacheKey) -> Path:
        return self.root / "tts_audio" / key.user / key.thread_id / key.message_id

    async def store(self, key: CacheKey, *, age: float) -> None:
        """Store through the cache (memory, Volume, index row) as if `age` seconds ago."""
        made = self.clock.now - age
        self.cache.put(key, entry(key.digest(), created_at=made))
        await self.cache.drain()
        for name in ("af_nicole.mp3", "af_nicole.meta.json"):
            backdate(self.folder(key) / name, made)

    async def hit(self, key: CacheKey) -> None:
        """A hit as the proxy records it: an index touch, or a Volume read."""
        if self.index is not None:
            await self.index.touch(key)
            assert await self.index.flush() == 1
        else:
            assert await self.volume.get(key) is not None

    async def stored(self) -> set[CacheKey]:
        """The keys on the Volume; with an index, its rows must name exactly those."""
        on_volume = {found.key for found in await self.volume.scan()}
        if self.index is not None:
            rows = {row.key for row in await self.index.list_entries(limit=1000)}
            assert rows == on_volume
        return on_volume

    def in_memory(self, key: CacheKey) -> bool:
        assert self.cache.memory is not None
        return self.cache.memory.get_nowait(key) is not None


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    """A factory: `await make_harness(dsn or None, name)`; everything is closed after the test."""
    made: list[Harness] = []

    async def make(dsn: str | None, name: str = "volume") -> Harness:
        root = tmp_path / name
        volume = LocalVolume(root)
        index: PostgresIndex | None = None
        if dsn is not None:
            index = PostgresIndex(dsn, timeout_seconds=5.0, flush_interval_seconds=60.0)
            await index.start()

        async def record(key: CacheKey, stored: Entry) -> None:
            assert index is not None
            await index.record(key, stored.meta, volume.location(key, stored.meta.content_type))

        memory = MemoryTier(max_bytes=10_000_000, ttl_seconds=0, max_entry_bytes=100_000)
        cache = TieredCache(
            memory,
            volume,
            timeout_seconds=5.0,
            logger=LOGGER,
            after_volume_write=record if index is not None else None,
        )
        harness = Harness(root, volume, cache, index, Clock())
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.cache.aclose()
        if harness.index is not None:
            await harness.index.aclose()


@pytest.fixture(params=["index", "walk"])
async def harness(
    request: pytest.FixtureRequest, make_harness: MakeHarness, postgres_dsn: str
) -> Harness:
    """The same janitor policy read from the PostgreSQL index, or from a walk of the Volume."""
    return await make_harness(postgres_dsn if request.param == "index" else None)


# Budgets


async def test_budget_held_after_storing_three_times_it(harness: Harness) -> None:
    keys = [key(n) for n in range(30)]
    for n, stored in enumerate(keys):
        await harness.store(stored, age=3000 - 10 * n)
    for oldest in keys[:3]:
        await harness.hit(oldest)
    janitor = harness.janitor(max_bytes=10 * SIZE)

    report = await janitor.run_once()

    assert report.elected
    assert report.evicted_budget == 20
    assert report.bytes_freed == 20 * SIZE
    kept = set(keys[:3]) | set(keys[23:])
    assert await harness.stored() == kept
    assert [harness.in_memory(k) for k in keys] == [k in kept for k in keys]
    assert (await janitor.run_once()).evicted == 0


async def test_ttl_expiry_with_an_injected_clock(harness: Harness) -> None:
    idle, hit, fresh = key(1), key(2), key(3)
    await harness.store(idle, age=2000)
    await harness.store(hit, age=2000)
    await harness.store(fresh, age=10)
    await harness.hit(hit)
    janitor = harness.janitor(ttl_seconds=1000)

    first = await janitor.run_once()

    assert first.evicted_ttl == 1
    assert await harness.stored() == {hit, fresh}
    assert not harness.in_memory(idle)

    harness.clock.now += 1500
    second = await janitor.run_once()

    assert second.evicted_ttl == 2
    assert await harness.stored() == set()


async def test_user_quota_does_not_touch_other_users(harness: Harness) -> None:
    alice = [key(n) for n in range(5)]
    bob = [key(n, BOB) for n in range(2)]
    for n, stored in enumerate(alice):
        await harness.store(stored, age=500 - 100 * n)
    for stored in bob:
        await harness.store(stored, age=5000)
    await harness.hit(alice[0])
    janitor = harness.janitor(user_max_bytes=3 * SIZE)

    report = await janitor.run_once()

    assert report.evicted_quota == 2
    assert await harness.stored() == {alice[0], alice[3], alice[4], *bob}


async def test_batches_are_bounded_and_converge(harness: Harness) -> None:
    keys = [key(n) for n in range(7)]
    for n, stored in enumerate(keys):
        await harness.store(stored, age=700 - 10 * n)
    for n in range(3):
        leftover = harness.folder(keys[-1]) / f".tmp-crash{n}"
        leftover.write_bytes(b"half an object")
        backdate(leftover, harness.clock.now - LONG_AGO)
    janitor = harness.janitor(batch=2, max_bytes=2 * SIZE)

    reports = [await janitor.run_once() for _ in range(8)]

    assert [r.evicted_budget for r in reports] == [2, 2, 1, 0, 0, 0, 0, 0]
    # The leftovers are found as the walk, a few folders a run, reaches theirs.
    assert all(r.orphans_removed <= 2 for r in reports)
    assert sum(r.orphans_removed for r in reports) == 3
    assert await harness.stored() == set(keys[5:])
    assert not list(harness.folder(keys[-1]).glob(".tmp-*"))


async def test_without_a_budget_no_run_walks_every_entry(make_harness: MakeHarness) -> None:
    harness = await make_harness(None)
    for n in range(3):
        await harness.store(key(n), age=100)

    unbudgeted = harness.janitor()
    report = await unbudgeted.run_once()
    budgeted = harness.janitor(max_bytes=100 * SIZE)
    await budgeted.run_once()

    assert report.elected and report.evicted == 0
    assert unbudgeted.last_walk is None
    # With a budget to keep, the run knows every entry (here: nothing over the budget).
    assert budgeted.last_walk is not None and budgeted.last_walk.entries == 3
    assert await harness.stored() == {key(n) for n in range(3)}


async def test_memory_hits_count_when_walking_and_reach_the_sidecar(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(None)
    keys = [key(n) for n in range(3)]
    for n, stored in enumerate(keys):
        await harness.store(stored, age=300 - 100 * n)
    janitor = harness.janitor(max_bytes=2 * SIZE)
    # A memory hit never reaches the Volume; the proxy tells the janitor instead.
    assert harness.cache.get_memory(keys[0]) is not None
    janitor.record_hit(keys[0])

    report = await janitor.run_once()

    assert report.evicted_budget == 1
    assert await harness.stored() == {keys[0], keys[2]}
    sidecar = harness.folder(keys[0]) / "af_nicole.meta.json"
    assert sidecar.stat().st_mtime == pytest.approx(harness.clock.now, abs=1e-3)


# Crash leftovers


async def test_crash_leftovers_are_cleaned_at_start(
    make_harness: MakeHarness,
    postgres_dsn: str,
) -> None:
    harness = await make_harness(postgres_dsn)
    volume, index = harness.volume, harness.index
    assert index is not None
    good = key(1)
    await harness.store(good, age=10)
    old = harness.clock.now - LONG_AGO

    tmp = harness.folder(good) / ".tmp-0123abcd"
    tmp.write_bytes(b"half an object")
    backdate(tmp, old)
    in_progress = harness.folder(good) / ".tmp-fresh"
    in_progress.write_bytes(b"a write still going on")

    lone_object = harness.folder(key(2)) / "af_nicole.mp3"
    lone_object.parent.mkdir(parents=True)
    lone_object.write_bytes(b"ID3 no sidecar")
    backdate(lone_object, old)

    no_object = key(3)
    await volume.put(no_object, entry("no object"))
    (harness.folder(no_object) / "af_nicole.mp3").unlink()
    backdate(harness.folder(no_object) / "af_nicole.meta.json", old)

    malformed = key(4)
    await volume.put(malformed, entry("malformed"))
    (harness.folder(malformed) / "af_nicole.meta.json").write_bytes(b"{not json")
    for name in ("af_nicole.mp3", "af_nicole.meta.json"):
        backdate(harness.folder(malformed) / name, old)

    gone = key(5)
    await index.record(gone, entry("gone").meta, volume.location(gone, "audio/mpeg"))

    empty = harness.root / "tts_audio" / BOB / "t-old" / "m-old"
    empty.mkdir(parents=True)
    backdate(empty, old)

    janitor = harness.janitor()
    janitor.start()
    try:
        await eventually(lambda: janitor.last_report is not None)
    finally:
        await janitor.aclose()

    report = janitor.last_report
    assert report is not None
    # tmp, lone object, lone sidecar, malformed sidecar and its object, the row without object
    assert report.orphans_removed == 6
    assert report.evicted == 0
    assert not tmp.exists()
    assert in_progress.exists()
    assert not lone_object.exists()
    assert list(harness.folder(no_object).iterdir()) == []
    assert list(harness.folder(malformed).iterdir()) == []
    assert not empty.exists()
    assert await harness.stored() == {good}
    assert await volume.get(good) == entry(good.digest(), created_at=harness.clock.now - 10)


# Election


async def test_only_one_of_two_janitors_sharing_postgres_is_elected(
    make_harness: MakeHarness, postgres_dsn: str
) -> None:
    first = await make_harness(postgres_dsn, "first")
    second = await make_harness(postgres_dsn, "second")
    janitors = [first.janitor(max_bytes=10 * SIZE), second.janitor(max_bytes=10 * SIZE)]
    # Hold the table so the elected janitor stays inside its run until the other has tried.
    blocker = await asyncpg.connect(postgres_dsn)
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("LOCK TABLE tts_cache.tts_cache_entries IN ACCESS EXCLUSIVE MODE")
        runs = [asyncio.create_task(janitor.run_once()) for janitor in janitors]
        done, _ = await asyncio.wait(runs, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        await holding.rollback()
    finally:
        await blocker.close()
    reports: list[JanitorReport] = list(await asyncio.gather(*runs))

    assert sorted(report.elected for report in reports) == [False, True]
    loser = janitors[[report.elected for report in reports].index(False)]
    assert done == {runs[janitors.index(loser)]}
    assert reports[janitors.index(loser)].duration < 5.0
    # The lease went with the winner's run.
    assert (await loser.run_once()).elected


# Databricks Volume


@pytest.fixture
def no_ambient_databricks_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Nothing from this machine's environment or ~/.databrickscfg leaks into the SDK."""
    for name in list(os.environ):
        if name.startswith(("DATABRICKS_", "ARM_", "AZURE_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    yield


@pytest.fixture
async def emulator(no_ambient_databricks_config: None) -> AsyncIterator[FilesApiEmulator]:
    server = FilesApiEmulator()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def databricks(emulator: FilesApiEmulator) -> AsyncIterator[TieredCache]:
    """A DatabricksVolume on the emulator behind a TieredCache (memory included)."""
    volume = DatabricksVolume(
        VolumeSettings(kind="databricks", path=DATABRICKS_ROOT, timeout_seconds=2.0, retries=0),
        host=emulator.url,
        config_options={"token": PAT},
        jitter=lambda: 0.0,
    )
    memory = MemoryTier(max_bytes=1_000_000, ttl_seconds=0, max_entry_bytes=100_000)
    cache = TieredCache(memory, volume, timeout_seconds=5.0, logger=LOGGER)
    yield cache
    await cache.aclose()


def remote(key: CacheKey, name: str = "af_nicole.mp3") -> str:
    return f"{DATABRICKS_BASE}/{key.user}/{key.thread_id}/{key.message_id}/{name}"


def databricks_volume(cache: TieredCache) -> DatabricksVolume:
    assert isinstance(cache.volume, DatabricksVolume)
    return cache.volume


async def test_databricks_leftovers_and_rows_without_objects(
    emulator: FilesApiEmulator, databricks: TieredCache, postgres_dsn: str
) -> None:
    volume = databricks_volume(databricks)
    index = PostgresIndex(postgres_dsn, timeout_seconds=5.0, flush_interval_seconds=60.0)
    await index.start()
    try:
        good, gone = key(1), key(5)
        kept_entry = entry("good")
        await volume.put(good, kept_entry)
        await index.record(good, kept_entry.meta, volume.location(good, "audio/mpeg"))
        await index.record(gone, entry("gone").meta, volume.location(gone, "audio/mpeg"))
        old = time.time() - LONG_AGO
        emulator.write(remote(key(2)), b"ID3 no sidecar")
        emulator.files[remote(key(2))].modified = old
        emulator.write(remote(key(3), "af_nicole.meta.json"), b"{}")
        emulator.files[remote(key(3), "af_nicole.meta.json")].modified = old
        emulator.write(remote(key(4)), b"ID3 an upload in progress")
        emulator.directories.add(f"{DATABRICKS_BASE}/{BOB}")
        janitor = Janitor(settings(max_bytes=10 * SIZE), databricks, volume, index)

        report = await janitor.run_once()

        assert report.elected
        assert report.orphans_removed == 3
        assert remote(key(2)) not in emulator.files
        assert remote(key(3), "af_nicole.meta.json") not in emulator.files
        assert remote(key(4)) in emulator.files
        assert f"{DATABRICKS_BASE}/{BOB}" not in emulator.directories
        assert {row.key for row in await index.list_entries()} == {good}
        assert await volume.get(good) == kept_entry
    finally:
        await index.aclose()


async def test_databricks_budget_by_walking_counts_idle_from_creation(
    emulator: FilesApiEmulator, databricks: TieredCache
) -> None:
    volume = databricks_volume(databricks)
    keys = [key(n) for n in range(6)]
    now = time.time()
    for n, stored in enumerate(keys):
        await volume.put(stored, entry(stored.digest()))
        for name in ("af_nicole.mp3", "af_nicole.meta.json"):
            emulator.files[remote(stored, name)].modified = now - 600 + 10 * n
    janitor = Janitor(settings(max_bytes=3 * SIZE), databricks, volume, None)
    # The Files API keeps no access times: a Volume read does not count as a hit...
    assert await volume.get(keys[1]) is not None
    # ...but a memory hit this process saw does.
    janitor.record_hit(keys[0])

    report = await janitor.run_once()

    assert report.evicted_budget == 3
    remaining = {listed.key async for listed in volume.list_entries()}
    assert remaining == {keys[0], keys[4], keys[5]}


async def test_the_loop_survives_a_failed_run_and_closes_cleanly(
    emulator: FilesApiEmulator, databricks: TieredCache
) -> None:
    volume = databricks_volume(databricks)
    for n in range(3):
        await volume.put(key(n), entry(f"loop {n}"))
    emulator.fail_next(1, status=403, method="GET")
    janitor = Janitor(settings(max_bytes=SIZE, interval=0.05), databricks, volume, None)

    janitor.start()
    try:
        await eventually(lambda: janitor.last_report is not None)
        assert janitor.errors == 1
        report = janitor.last_report
        assert report is not None
        assert report.evicted_budget == 2
        await asyncio.sleep(0.01)
        # A run stuck on the Volume is cancelled, not waited for.
        emulator.hang_next(1, method="GET")
        await eventually(lambda: emulator.count("GET") > 0 and not emulator.faults[-1].remaining)
    finally:
        started = time.monotonic()
        await janitor.aclose()
    assert time.monotonic() - started < 1.0
    assert janitor.errors == 1
