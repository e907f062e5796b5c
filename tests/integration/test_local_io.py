"""The local Volume's threads: writes below the loop's priority, reads waited for briefly."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.local import LocalVolume
from proxy.storage.local.io import BACKGROUND_NICE, READ_WAIT_SECONDS
from tests.local_volume import KEY, entry


def thread_nice_values() -> dict[int, int]:
    """Every thread of this process and its nice value (/proc/self/task/*/stat, field 19)."""
    values = {}
    for task in Path("/proc/self/task").iterdir():
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        values[int(task.name)] = int(fields[16])
    return values


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
async def test_writes_run_in_threads_of_lower_priority_than_reads_and_the_loop(
    tmp_path: Path,
) -> None:
    before = thread_nice_values()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    volume = LocalVolume(tmp_path)
    try:
        await volume.put(KEY, entry())
        written = thread_nice_values()
        assert await volume.get(KEY) is not None
        after = thread_nice_values()
    finally:
        await volume.aclose()
    writers = {tid for tid in written if tid not in before}
    readers = {tid for tid in after if tid not in written}
    assert writers and readers
    assert {written[tid] for tid in writers} == {min(19, ours + BACKGROUND_NICE)}
    assert {after[tid] for tid in readers} == {ours}
    assert after[threading.get_native_id()] == ours


async def test_a_slow_read_holds_the_event_loop_no_longer_than_the_read_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = LocalVolume(tmp_path)
    await volume.put(KEY, entry())
    read = volume._get_sync

    def slow_read(key: CacheKey) -> Entry | None:
        time.sleep(0.2)  # a cold disk
        return read(key)

    monkeypatch.setattr(volume, "_get_sync", slow_read)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        started = time.perf_counter()
        found = await volume.get(KEY)
        second = await volume.get(KEY)  # within the back-off: awaited at once
        took = time.perf_counter() - started
    finally:
        ticking.cancel()
        await volume.aclose()
    assert found is not None and found.body == entry().body
    assert second is not None and second.body == entry().body
    assert took >= 0.4
    # The loop went on while the reads waited for the disk: it was held once, for the wait.
    assert max(gaps) < READ_WAIT_SECONDS + 0.05
    assert len(gaps) > 100


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
async def test_writes_queued_past_the_background_threads_run_at_normal_priority(
    tmp_path: Path,
) -> None:
    before = thread_nice_values()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    volume = LocalVolume(tmp_path)
    keys = [CacheKey("alice@example.com", "t-9", f"m-{n}", "af_nicole") for n in range(12)]
    try:
        await asyncio.gather(*(volume.put(key, entry()) for key in keys))
        during = thread_nice_values()
        found = [await volume.get(key) for key in keys]
    finally:
        await volume.aclose()
    assert all(item is not None and item.body == entry().body for item in found)
    writers = {during[tid] for tid in during if tid not in before}
    # Four low-priority writers had their hands full: the rest went to normal-priority ones.
    assert writers == {ours, min(19, ours + BACKGROUND_NICE)}
