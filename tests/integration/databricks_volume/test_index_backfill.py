"""The walk that records a Databricks Volume in the index: resumable, skips what is not servable,
covers the Volume only when no gap was reported since it began."""

from __future__ import annotations

from proxy.index.backfill import IndexBackfill
from proxy.index.coverage import VolumeCoverage
from proxy.speak import CacheKey
from tests.databricks_volume_support import BASE, MakeVolume, audio, entry_for
from tests.fakes.files_api import FilesApiEmulator
from tests.index_support import MakeIndex, make_index_fixture  # noqa: F401

KEYS = [
    CacheKey("alice", "t1", "m1", "af_nicole"),
    CacheKey("alice", "t1", "m1", "am_adam"),
    CacheKey("alice", "t1", "m2", "af_nicole"),
    CacheKey("alice", "t2", "m3", "af_nicole"),
    CacheKey("bob", "t1", "m1", "af_nicole"),
]


async def test_the_walk_records_what_the_index_lacks_a_batch_at_a_time(
    emulator: FilesApiEmulator, make_volume: MakeVolume, make_index: MakeIndex
) -> None:
    volume = make_volume()
    index = await make_index()
    for key in KEYS:
        await volume.put(key, entry_for(audio(seed=key.digest())))
    # One already recorded (it reads no sidecar); one torn (its object is shorter than its
    # sidecar says); one sidecar without an object.
    meta = await volume.read_meta(KEYS[0])
    assert meta is not None
    await index.record(KEYS[0], meta, volume.location(KEYS[0], meta.content_type))
    torn = CacheKey("carol", "t1", "m1", "af_nicole")
    await volume.put(torn, entry_for(audio(seed="torn")))
    emulator.write(f"{BASE}/carol/t1/m1/af_nicole.mp3", b"short")
    lone = CacheKey("dave", "t1", "m1", "af_nicole")
    await volume.put(lone, entry_for(audio(seed="lone")))
    del emulator.files[f"{BASE}/dave/t1/m1/af_nicole.mp3"]

    now = [0.0]
    coverage = VolumeCoverage(index.pool, "databricks:test")
    walk = IndexBackfill(volume, index, coverage, rewalk_seconds=60.0, clock=lambda: now[0])
    sidecar_reads = emulator.count("GET", "files", ".meta.json")
    steps = []
    while not (step := await walk.step(2)).ended:
        steps.append(step)
        assert step.walked == 2 and not await coverage.covered()
    steps.append(step)

    assert step.covered and await coverage.covered()
    assert sum(s.walked for s in steps) == 7  # every sidecar listed
    assert sum(s.recorded for s in steps) == 4
    assert await index.known([*KEYS, torn, lone]) == set(KEYS)
    # Sidecars read: those of the unrecorded entries with an object (4) and the torn one.
    assert emulator.count("GET", "files", ".meta.json") - sidecar_reads == 5
    # Covered: the next walk waits rewalk_seconds, then records only what is new.
    assert (await walk.step(10)).walked == 0
    now[0] = 61.0
    again = await walk.step(10)
    assert (again.walked, again.recorded, again.ended, again.covered) == (7, 0, True, True)


async def test_a_gap_reported_during_the_walk_makes_it_walk_again(
    emulator: FilesApiEmulator, make_volume: MakeVolume, make_index: MakeIndex
) -> None:
    volume = make_volume()
    index = await make_index()
    for key in KEYS[:3]:
        await volume.put(key, entry_for(audio(seed=key.digest())))
    coverage = VolumeCoverage(index.pool, "databricks:test")
    walk = IndexBackfill(volume, index, coverage)
    assert not (await walk.step(1)).ended
    await coverage.withdraw()  # a process gave up on a row meanwhile
    step = await walk.step(10)
    assert step.ended and not step.covered and not await coverage.covered()
    step = await walk.step(10)  # at once: a new walk, begun after the gap
    assert step.ended and step.covered and step.recorded == 0
