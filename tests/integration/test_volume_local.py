"""LocalVolume on a real folder: layout, restarts, corruption, invalid keys, the fast path."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from proxy.speak import CacheKey
from proxy.storage.local import LocalVolume
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import DurableTier
from tests.local_volume import BAD_IDS, KEY, anything_under, entry, files_under, folder


async def test_round_trip_uses_the_documented_layout(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    stored = entry()

    await volume.put(KEY, stored)
    found = await volume.get(KEY)

    assert found == stored
    assert files_under(tmp_path) == [
        "tts_audio/alice@example.com/t-9/m-123/af_nicole.meta.json",
        "tts_audio/alice@example.com/t-9/m-123/af_nicole.mp3",
    ]
    assert (folder(tmp_path) / "af_nicole.mp3").read_bytes() == stored.body
    sidecar = json.loads((folder(tmp_path) / "af_nicole.meta.json").read_text())
    assert sidecar["object"] == "af_nicole.mp3"
    assert sidecar["key"] == {
        "user": "alice@example.com",
        "thread_id": "t-9",
        "message_id": "m-123",
        "voice": "af_nicole",
    }
    assert sidecar["body_sha256"] == stored.meta.body_sha256
    assert sidecar["length"] == len(stored.body)


async def test_missing_entry_is_a_miss(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    assert await volume.get(KEY) is None
    await volume.delete(KEY)


async def test_a_new_instance_on_the_same_root_finds_the_entry(tmp_path: Path) -> None:
    stored = entry()
    await LocalVolume(tmp_path, prefix="audio").put(KEY, stored)

    restarted = LocalVolume(tmp_path, prefix="audio")

    assert await restarted.get(KEY) == stored
    assert await LocalVolume(tmp_path).get(KEY) is None  # another prefix is another tree


@pytest.mark.parametrize("read_first", [False, True])
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "delete"])
async def test_damaged_object_is_a_miss_and_removed(
    tmp_path: Path, damage: str, read_first: bool
) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    if read_first:
        # A verified read is remembered: damage done afterwards must still be caught.
        assert await volume.get(KEY) == entry()
    obj = folder(tmp_path) / "af_nicole.mp3"
    data = bytearray(obj.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        obj.write_bytes(bytes(data))
    elif damage == "truncate":
        obj.write_bytes(bytes(data[:-1]))
    elif damage == "extend":
        obj.write_bytes(bytes(data) + b"\0")
    else:
        obj.unlink()

    assert await volume.get(KEY) is None
    assert files_under(tmp_path) == []
    # A missing object is a torn entry; the others are corrupt, and counted.
    assert volume.corrupt_entries == (0 if damage == "delete" else 1)
    assert volume.breaker_state == "closed" and volume.breaker.consecutive_failures == 0


@pytest.mark.parametrize(
    "sidecar",
    [
        b"",
        b"{not json",
        b"[]",
        b"\xff\xfe",
        b'{"content_type": "audio/mpeg"}',
        b"[" * 100_000,
    ],
)
async def test_malformed_sidecar_is_a_miss_and_removed(tmp_path: Path, sidecar: bytes) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    (folder(tmp_path) / "af_nicole.meta.json").write_bytes(sidecar)

    assert await volume.get(KEY) is None
    assert files_under(tmp_path) == []
    assert volume.corrupt_entries == 1


@pytest.mark.parametrize(
    "change",
    [
        {"object": "../../../../../etc/passwd"},
        {"object": "af_nicole.wav"},
        {"key": {"user": "bob", "thread_id": "t-9", "message_id": "m-123", "voice": "af_nicole"}},
        {"length": "12"},
        {"headers": [[1, 2, 3]]},
    ],
)
async def test_tampered_sidecar_is_a_miss(tmp_path: Path, change: dict[str, object]) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    path = folder(tmp_path) / "af_nicole.meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    assert await volume.get(KEY) is None
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["user", "thread_id", "message_id", "voice"])
async def test_invalid_keys_raise_and_touch_nothing(tmp_path: Path, field: str, bad: str) -> None:
    root = tmp_path / "volume"
    volume = LocalVolume(root)
    parts = {"user": "alice", "thread_id": "t", "message_id": "m", "voice": "v"} | {field: bad}
    key = CacheKey(**parts)

    with pytest.raises(ValueError):
        await volume.put(key, entry())
    with pytest.raises(ValueError):
        await volume.get(key)
    with pytest.raises(ValueError):
        await volume.delete(key)

    assert anything_under(tmp_path) == []


def test_invalid_prefix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalVolume(tmp_path, prefix="../elsewhere")


async def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "tts_audio").mkdir(parents=True)
    (root / "tts_audio" / KEY.user).symlink_to(outside, target_is_directory=True)
    volume = LocalVolume(root)

    with pytest.raises(ValueError):
        await volume.put(KEY, entry())
    assert anything_under(outside) == []
    # Nothing there: a miss, told without following the link anywhere.
    assert await volume.get(KEY) is None
    # Something there, outside the root: refused, not read.
    planted = outside / KEY.thread_id / KEY.message_id
    planted.mkdir(parents=True)
    (planted / f"{KEY.voice}.meta.json").write_text("{}")
    with pytest.raises(ValueError):
        await volume.get(KEY)


async def test_a_message_folder_linked_out_of_a_known_thread_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    outside = tmp_path / "outside"
    outside.mkdir()
    volume = LocalVolume(root)
    await volume.put(KEY, entry())  # the thread's folder is resolved and remembered
    linked = CacheKey(KEY.user, KEY.thread_id, "m-linked", KEY.voice)
    folder(root, linked).symlink_to(outside, target_is_directory=True)

    with pytest.raises(ValueError):
        await volume.put(linked, entry())
    assert anything_under(outside) == []
    assert await volume.get(KEY) == entry()


async def test_a_new_extension_replaces_the_old_object(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry(b"mp3 bytes"))
    wav = entry(b"RIFF wav bytes", content_type="audio/wav")

    await volume.put(KEY, wav)

    assert await volume.get(KEY) == wav
    assert sorted(p.name for p in folder(tmp_path).iterdir()) == [
        "af_nicole.meta.json",
        "af_nicole.wav",
    ]


async def test_overwrite_with_the_same_extension(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry(b"first"))
    await volume.put(KEY, entry(b"second"))
    found = await volume.get(KEY)
    assert found is not None
    assert found.body == b"second"
    assert not [p for p in folder(tmp_path).iterdir() if p.name.startswith(".tmp-")]


async def test_delete_removes_object_and_sidecar(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    other = CacheKey(KEY.user, KEY.thread_id, KEY.message_id, "am_adam")
    await volume.put(KEY, entry())
    await volume.put(other, entry(b"other voice"))

    await volume.delete(KEY)

    assert await volume.get(KEY) is None
    assert await volume.get(other) is not None
    assert sorted(p.name for p in folder(tmp_path).iterdir()) == [
        "am_adam.meta.json",
        "am_adam.mp3",
    ]


async def test_concurrent_puts_and_gets_never_serve_or_lose_a_mix(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    versions = [
        entry(bytes([n]) * 50_000, "audio/mpeg" if n % 2 else "audio/wav") for n in range(8)
    ]
    await volume.put(KEY, versions[0])

    async def reader() -> None:
        for _ in range(20):
            found = await volume.get(KEY)
            assert found is None or found in versions

    writes = [volume.put(KEY, version) for version in versions[1:]]
    await asyncio.gather(*writes, *(reader() for _ in range(4)))

    # Readers racing writers must not have taken a fresh object for a corrupt one and removed it.
    assert await volume.get(KEY) in versions[1:]


async def test_tiered_cache_over_a_real_volume_survives_a_restart(tmp_path: Path) -> None:
    def tiers() -> TieredCache:
        memory = MemoryTier(max_bytes=1_000_000, ttl_seconds=60, max_entry_bytes=100_000)
        volume = LocalVolume(tmp_path)
        return TieredCache(memory, volume, timeout_seconds=5, logger=logging.getLogger("test"))

    first = tiers()
    stored = entry()
    first.put(KEY, stored)
    await first.aclose()

    second = tiers()
    assert await second.get(KEY) == (stored, "volume")
    assert await second.get(KEY) == (stored, "memory")
    assert second.errors == {}


async def test_a_verified_hit_is_read_without_a_thread_and_checked_again(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    stored = entry()
    await volume.put(KEY, stored)
    assert volume.get_nowait(KEY) is None  # never verified yet: the thread reads it first
    assert await volume.get(KEY) == stored
    quick = volume.get_nowait(KEY)
    if quick is None:
        pytest.skip("this filesystem refuses RWF_NOWAIT reads")
    assert quick == stored
    # Any rewrite of the object makes the remembered verification worthless.
    obj = folder(tmp_path) / "af_nicole.mp3"
    data = bytearray(obj.read_bytes())
    data[3] ^= 0xFF
    obj.write_bytes(bytes(data))
    assert volume.get_nowait(KEY) is None
    assert await volume.get(KEY) is None


async def test_it_declares_itself_a_durable_tier_with_a_breaker(tmp_path: Path) -> None:
    volume: DurableTier = LocalVolume(tmp_path)
    assert volume.kind == "local"
    assert volume.breaker_state == "closed"
    assert volume.corrupt_entries == 0
    assert volume.walkable is True
    assert volume.describe() == "local folder, breaker closed"


async def test_open_answers_the_whole_entry_as_get_does(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    assert await volume.open(KEY) is None
    await volume.put(KEY, entry())
    assert await volume.open(KEY) == entry()


async def test_read_meta_reads_the_sidecar_alone_and_removes_nothing(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    assert await volume.read_meta(KEY) is None
    await volume.put(KEY, entry())
    assert await volume.read_meta(KEY) == entry().meta
    (folder(tmp_path) / "af_nicole.mp3").unlink()
    assert await volume.read_meta(KEY) == entry().meta  # the body is not looked at
    (folder(tmp_path) / "af_nicole.meta.json").write_bytes(b"{not json")
    assert await volume.read_meta(KEY) is None
    assert files_under(tmp_path) == ["tts_audio/alice@example.com/t-9/m-123/af_nicole.meta.json"]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_lookups_refuse_invalid_keys(tmp_path: Path, bad: str) -> None:
    volume = LocalVolume(tmp_path)
    key = CacheKey(KEY.user, KEY.thread_id, bad, KEY.voice)
    with pytest.raises(ValueError):
        await volume.open(key)
    with pytest.raises(ValueError):
        await volume.read_meta(key)
    with pytest.raises(ValueError):
        await volume.exists(key)
    with pytest.raises(ValueError):
        volume.location(key, "audio/mpeg")


async def test_ping_is_whether_the_folder_or_its_nearest_parent_is_writable(
    tmp_path: Path,
) -> None:
    assert await LocalVolume(tmp_path / "not" / "made" / "yet").ping() is True
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_bytes(b"")
    assert await LocalVolume(not_a_folder / "below").ping() is False
