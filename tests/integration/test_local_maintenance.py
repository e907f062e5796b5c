"""The local Volume's walks: removing subtrees, clearing leftovers, listing entries."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from pathlib import Path

import pytest

from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo
from proxy.storage.local import LocalVolume
from tests.local_volume import BAD_IDS, KEY, entry, files_under, folder


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_delete_prefix_refuses_invalid_ids(tmp_path: Path, bad: str) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    with pytest.raises(ValueError):
        await volume.delete_prefix(bad)
    with pytest.raises(ValueError):
        await volume.delete_prefix(KEY.user, bad)
    with pytest.raises(ValueError):
        await volume.delete_prefix(KEY.user, KEY.thread_id, bad)
    assert await volume.get(KEY) is not None


async def test_clean_leftovers_removes_only_temporary_files(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    here = folder(tmp_path)
    (here / ".tmp-0123abcd").write_bytes(b"half an object")
    (here.parent / ".tmp-deadbeef").write_bytes(b"")
    (tmp_path / "tts_audio" / ".tmp-x").write_bytes(b"{")

    assert await volume.clean_leftovers() == 3

    assert await volume.get(KEY) == entry()
    assert files_under(tmp_path) == [
        "tts_audio/alice@example.com/t-9/m-123/af_nicole.meta.json",
        "tts_audio/alice@example.com/t-9/m-123/af_nicole.mp3",
    ]
    assert await volume.clean_leftovers() == 0


async def test_clean_leftovers_on_an_empty_root(tmp_path: Path) -> None:
    assert await LocalVolume(tmp_path / "absent").clean_leftovers() == 0


async def test_delete_prefix_removes_a_subtree(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    keys = [
        CacheKey("alice", "t-1", "m-1", "v1"),
        CacheKey("alice", "t-1", "m-1", "v2"),
        CacheKey("alice", "t-1", "m-2", "v1"),
        CacheKey("alice", "t-2", "m-3", "v1"),
        CacheKey("bob", "t-1", "m-1", "v1"),
    ]
    for key in keys:
        await volume.put(key, entry())

    assert await volume.delete_prefix("alice", "t-1", "m-1") == 2
    assert await volume.get(keys[0]) is None
    assert await volume.get(keys[2]) is not None
    assert await volume.delete_prefix("alice", "t-1") == 1
    assert await volume.delete_prefix("alice") == 1
    assert await volume.delete_prefix("alice") == 0
    assert await volume.get(keys[4]) is not None
    with pytest.raises(ValueError):
        await volume.delete_prefix("alice", None, "m-1")


async def test_list_entries_gives_the_scan_figures_under_a_prefix(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    keys = [
        CacheKey("alice", "t-1", "m-1", "v1"),
        CacheKey("alice", "t-1", "m-1", "v2"),
        CacheKey("alice", "t-1", "m-2", "v1"),
        CacheKey("alice", "t-2", "m-3", "v1"),
        CacheKey("bob", "t-1", "m-1", "v1"),
    ]
    for key in keys:
        await volume.put(key, entry())
    scanned = {info.key: info for info in await volume.scan()}
    assert set(scanned) == set(keys)
    assert {info.bytes for info in scanned.values()} == {len(entry().body)}

    async def listed(*ids: str | None) -> dict[CacheKey, EntryInfo]:
        return {info.key: info async for info in volume.list_entries(*ids)}

    assert await listed() == scanned
    assert await listed("alice") == {key: scanned[key] for key in keys[:4]}
    assert await listed("alice", "t-1") == {key: scanned[key] for key in keys[:3]}
    assert await listed("alice", "t-1", "m-1") == {key: scanned[key] for key in keys[:2]}
    assert await listed("nobody") == {}
    for ids in [(None, "t-1"), ("alice", None, "m-1"), ("../x",), ("alice", "..")]:
        with pytest.raises(ValueError):
            await listed(*ids)


async def test_walks_do_not_follow_a_link_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    elsewhere = LocalVolume(outside)
    await elsewhere.put(KEY, entry())
    root = tmp_path / "volume"
    (root / "tts_audio").mkdir(parents=True)
    (root / "tts_audio" / KEY.user).symlink_to(
        outside / "tts_audio" / KEY.user, target_is_directory=True
    )
    volume = LocalVolume(root)

    assert await volume.scan() == []
    assert [info async for info in volume.list_entries(KEY.user)] == []
    assert await volume.clean_orphans(limit=10, older_than=float("inf")) == 0
    assert await elsewhere.get(KEY) == entry()


async def test_delete_prefix_while_another_process_writes_under_it(tmp_path: Path) -> None:
    # Another worker's write lands in the folder while the purge removes it: no error for the
    # purge (that worker removes what it wrote when the purge reaches it).
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    stop = threading.Event()

    def write_files() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            target = folder(tmp_path)
            with contextlib.suppress(OSError):
                target.mkdir(parents=True, exist_ok=True)
                (target / f"other-{n}.mp3").write_bytes(b"x")

    writer = threading.Thread(target=write_files)
    writer.start()
    try:
        for _ in range(20):
            await volume.delete_prefix(KEY.user)
    finally:
        stop.set()
        writer.join()


async def test_the_orphan_walk_looks_at_a_bounded_number_of_folders_and_resumes(
    tmp_path: Path,
) -> None:
    volume = LocalVolume(tmp_path)
    keys = [CacheKey(KEY.user, KEY.thread_id, f"m-{n}", KEY.voice) for n in range(6)]
    for stored in keys:
        await volume.put(stored, entry())
        (folder(tmp_path, stored) / ".tmp-crashed").write_bytes(b"half an object")
    never = 2**40  # everything counts as old

    first = await volume.clean_orphans(limit=2, older_than=never)
    left = [k for k in keys if (folder(tmp_path, k) / ".tmp-crashed").exists()]
    # Two folders looked at, one leftover each; the others wait for the next calls.
    assert first == 2 and len(left) == 4
    removed = [await volume.clean_orphans(limit=2, older_than=never) for _ in range(4)]
    assert sum(removed) == 4
    assert not list((tmp_path / "tts_audio").rglob(".tmp-*"))
    assert [await volume.get(k) for k in keys] == [entry()] * 6
    await volume.aclose()


async def test_totals_stop_walking_a_volume_grown_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.admin import entries
    from proxy.storage.tiered import TieredCache

    monkeypatch.setattr(entries, "TOTALS_WALK_LIMIT", 2)
    volume = LocalVolume(tmp_path)
    cache = TieredCache(None, volume, timeout_seconds=5, logger=logging.getLogger("test"))
    now = [0.0]
    browser = entries.EntryBrowser(cache, None, clock=lambda: now[0])
    await volume.put(KEY, entry())
    small = await browser.volume_totals()
    for n in range(2):
        await volume.put(CacheKey(KEY.user, KEY.thread_id, f"m-{n}", KEY.voice), entry())
    now[0] += 60
    counted = await browser.volume_totals()  # the walk that finds it past the limit
    now[0] += 60
    past = await browser.volume_totals()
    await volume.aclose()

    assert small is not None and small.entries == 1
    assert counted is not None and counted.entries == 3
    assert past is None  # not walked again for totals
