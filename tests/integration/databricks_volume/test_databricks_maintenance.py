"""The DatabricksVolume's walks on the emulator: paged listings, prefix removal, orphans."""

from __future__ import annotations

import time

import pytest

from proxy.speak import CacheKey
from tests.databricks_volume_support import (
    BASE,
    MakeVolume,
    audio,
    entry_for,
)
from tests.fakes.files_api import FilesApiEmulator

# Listing and purge


async def test_list_entries_and_delete_prefix_walk_paged_listings(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    emulator.page_limit = 2
    volume = make_volume()
    keys = [
        CacheKey("alice", "t1", "m1", "af_nicole"),
        CacheKey("alice", "t1", "m1", "am_adam"),
        CacheKey("alice", "t1", "m2", "af_nicole"),
        CacheKey("alice", "t2", "m3", "af_nicole"),
        CacheKey("bob", "t1", "m1", "af_nicole"),
    ]
    for key in keys:
        await volume.put(key, entry_for(audio(seed=key.digest())))

    async def listed(*parts: str) -> set[CacheKey]:
        return {item.key async for item in volume.list_entries(*parts)}

    assert await listed() == set(keys)
    assert await listed("alice") == set(keys[:4])
    assert await listed("alice", "t1", "m1") == set(keys[:2])
    first = [item async for item in volume.list_entries("bob")]
    assert first[0].created_at is not None and first[0].created_at > 0

    assert await volume.delete_prefix("alice", "t1") == 3
    assert await listed("alice") == {keys[3]}
    assert await volume.get(keys[4]) is not None
    assert f"{BASE}/alice/t1" not in emulator.directories
    assert f"{BASE}/alice/t2" in emulator.directories
    assert await volume.delete_prefix("alice") == 1
    assert await volume.delete_prefix("nobody") == 0
    assert await listed() == {keys[4]}

    with pytest.raises(ValueError):
        await volume.delete_prefix("alice", None, "m1")
    with pytest.raises(ValueError):
        await volume.delete_prefix("../etc")


async def test_scan_and_list_entries_give_the_same_records(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    emulator.page_limit = 2
    volume = make_volume()
    bodies = {
        CacheKey("alice", "t1", "m1", "af_nicole"): audio(1000, seed="a"),
        CacheKey("alice", "t1", "m1", "am_adam"): audio(2000, seed="b"),
        CacheKey("bob", "t1", "m1", "af_nicole"): audio(3000, seed="c"),
    }
    for key, body in bodies.items():
        await volume.put(key, entry_for(body))
    written = time.time() - 600
    for key in bodies:
        folder = f"{BASE}/{key.user}/{key.thread_id}/{key.message_id}"
        emulator.files[f"{folder}/{key.voice}.meta.json"].modified = written

    scanned = sorted(await volume.scan(), key=lambda found: found.key)
    listed = sorted([found async for found in volume.list_entries()], key=lambda found: found.key)

    assert scanned == listed
    assert {found.key: found.bytes for found in scanned} == {
        key: len(body) for key, body in bodies.items()
    }
    # The Files API keeps no access times: created = last hit = the sidecar's last write.
    assert all(abs(found.created_at - written) < 0.01 for found in scanned)
    assert all(found.last_hit_at == found.created_at for found in scanned)


async def test_list_entries_names_a_sidecar_without_its_object_and_scan_does_not(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    whole, torn = (
        CacheKey("alice", "t1", "m1", "af_nicole"),
        CacheKey("bob", "t1", "m1", "af_nicole"),
    )
    for key in (whole, torn):
        await volume.put(key, entry_for(audio(seed=key.user)))
    emulator.files.pop(f"{BASE}/bob/t1/m1/af_nicole.mp3")

    assert {found.key for found in await volume.scan()} == {whole}
    assert {found.key async for found in volume.list_entries()} == {whole, torn}


async def test_the_orphan_walk_lists_at_most_limit_folders_and_resumes(
    emulator: FilesApiEmulator, make_volume: MakeVolume
) -> None:
    volume = make_volume()
    old = time.time() - 3600
    orphans = [f"{BASE}/alice/t1/m{n}/af_nicole.mp3" for n in range(4)]
    for path in orphans:
        emulator.write(path, b"ID3 no sidecar")
        emulator.files[path].modified = old

    removed = 0
    for _ in range(20):
        before = emulator.count("GET", "directories")
        removed += await volume.clean_orphans(limit=1, older_than=time.time() - 60)
        # One folder listed per call, plus the voice's own listing before a removal.
        assert emulator.count("GET", "directories") - before <= 2
        if not any(path in emulator.files for path in orphans):
            break
    assert removed == len(orphans)
    assert not any(path in emulator.files for path in orphans)
