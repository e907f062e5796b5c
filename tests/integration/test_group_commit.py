"""The local Volume's writes: staged, published and made durable by one sync per batch."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from proxy.speak import CacheKey
from proxy.storage.local import LocalVolume, commit
from proxy.storage.local.commit import GroupCommit, Publish
from tests.local_volume import KEY, entry, files_under, folder


def keys(count: int) -> list[CacheKey]:
    """`count` keys in as many message folders."""
    return [CacheKey(KEY.user, KEY.thread_id, f"m-{n}", KEY.voice) for n in range(count)]


async def test_writes_waiting_behind_a_batch_are_made_durable_together(tmp_path: Path) -> None:
    volume = LocalVolume(tmp_path)
    commits = volume._threads.commits
    taken, release = threading.Event(), threading.Event()

    def held() -> Publish:
        taken.set()
        release.wait()
        return lambda: str(tmp_path)

    try:
        first = asyncio.create_task(commits.write(held))
        await asyncio.to_thread(taken.wait)  # the thread is inside the first batch
        waiting = [asyncio.create_task(volume.put(key, entry())) for key in keys(12)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)  # none is done before its sync
        release.set()
        await asyncio.gather(first, *waiting)
        found = [await volume.get(key) for key in keys(12)]
    finally:
        release.set()
        await volume.aclose()
    assert all(item == entry() for item in found)
    # One sync for the first write, one for the twelve that queued behind it.
    assert (commits.batches, commits.entries) == (2, 13)
    assert not [name for name in files_under(tmp_path) if ".tmp-" in name]


async def test_a_write_that_fails_fails_alone(tmp_path: Path) -> None:
    commits = GroupCommit()
    gate = threading.Event()

    def held() -> Publish:
        gate.wait()
        return lambda: str(tmp_path)

    def broken() -> Publish:
        raise OSError(errno.ENOSPC, "no space left")

    try:
        first = asyncio.create_task(commits.write(held))
        await asyncio.sleep(0.01)
        results = asyncio.gather(commits.write(broken), commits.write(held), return_exceptions=True)
        gate.set()
        await first
        failed, written = await results
    finally:
        gate.set()
        await commits.aclose()
    assert isinstance(failed, OSError) and failed.errno == errno.ENOSPC
    assert written is None


async def test_a_failed_sync_fails_every_write_of_its_batch_and_opens_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_sync(folders: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(commit, "sync_filesystems", failing_sync)
    volume = LocalVolume(tmp_path)
    try:
        with pytest.raises(OSError):
            await volume.put(KEY, entry())
        # Not durable, so reported failed; what was published is still checked on every read.
        assert await volume.get(KEY) == entry()
    finally:
        await volume.aclose()


@pytest.mark.parametrize("lost", ["emptied", "zeroed"])
async def test_an_entry_whose_bytes_a_crash_lost_is_never_served(tmp_path: Path, lost: str) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    await volume.aclose()
    # A crash before the batch's sync can keep the names (sidecar and object) and lose the
    # object's bytes: the file is left empty, or its blocks read as zeros.
    obj = folder(tmp_path) / "af_nicole.mp3"
    size = obj.stat().st_size
    obj.write_bytes(b"" if lost == "emptied" else bytes(size))

    restarted = LocalVolume(tmp_path)
    try:
        assert await restarted.get(KEY) is None
        assert files_under(tmp_path) == []
    finally:
        await restarted.aclose()
