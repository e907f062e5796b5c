"""The local Volume's threads: walks below the loop's priority, reads never on the loop."""

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
from proxy.storage.local.io import BACKGROUND_NICE
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
async def test_walks_and_deletes_run_below_the_loops_priority_writes_and_reads_at_it(
    tmp_path: Path,
) -> None:
    before = thread_nice_values()
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    volume = LocalVolume(tmp_path)
    try:
        await volume.put(KEY, entry())
        written = thread_nice_values()
        assert await volume.get(KEY) is not None
        read = thread_nice_values()
        await volume.delete(KEY)
        deleted = thread_nice_values()
    finally:
        await volume.aclose()
    writer = {tid for tid in written if tid not in before}
    readers = {tid for tid in read if tid not in written}
    background = {tid for tid in deleted if tid not in read}
    assert writer and readers and background
    assert {written[tid] for tid in writer} == {ours}
    assert {read[tid] for tid in readers} == {ours}
    assert {deleted[tid] for tid in background} == {min(19, ours + BACKGROUND_NICE)}
    assert deleted[threading.get_native_id()] == ours


async def test_a_slow_read_never_holds_the_event_loop(
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
        second = await volume.get(KEY)
        took = time.perf_counter() - started
    finally:
        ticking.cancel()
        await volume.aclose()
    assert found is not None and found.body == entry().body
    assert second is not None and second.body == entry().body
    assert took >= 0.4
    # The loop went on while the reads waited for the disk.
    assert max(gaps) < 0.05
    assert len(gaps) > 100
