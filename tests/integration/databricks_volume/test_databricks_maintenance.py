"""The DatabricksVolume's walks on the emulator: paged listings, prefix removal, orphans."""

from __future__ import annotations

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
