"""DiskGuard with an injected statvfs: cached answers, refreshed off the event loop."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.config import VolumeSettings
from proxy.storage.disk import DiskGuard

MIB = 1_048_576


@dataclass
class FsStats:
    f_bavail: int
    f_frsize: int = 4096


class FakeDisk:
    """A statvfs whose free space the test sets; it records every call and its thread."""

    def __init__(self, free_bytes: int) -> None:
        self.free_bytes = free_bytes
        self.paths: list[str] = []
        self.threads: set[int] = set()
        self.error: OSError | None = None

    def __call__(self, path: str) -> FsStats:
        self.paths.append(path)
        self.threads.add(threading.get_ident())
        if self.error is not None:
            raise self.error
        return FsStats(self.free_bytes // 4096)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard(tmp_path: Path, disk: FakeDisk, clock: Clock, minimum: int = 100 * MIB) -> DiskGuard:
    return DiskGuard(tmp_path, minimum, check_interval_seconds=5.0, statvfs=disk, clock=clock)


async def test_admission_pauses_below_the_minimum_and_resumes_above(tmp_path: Path) -> None:
    disk, clock = FakeDisk(500 * MIB), Clock()
    subject = guard(tmp_path, disk, clock)

    assert await subject.refresh()
    assert subject.admitting()
    assert subject.free_bytes == 500 * MIB

    disk.free_bytes = 10 * MIB
    assert not await subject.refresh()
    assert not subject.admitting()

    disk.free_bytes = 200 * MIB
    assert await subject.refresh()
    assert subject.admitting()


async def test_requests_read_a_cached_answer_and_refresh_at_most_once_an_interval(
    tmp_path: Path,
) -> None:
    disk, clock = FakeDisk(500 * MIB), Clock()
    subject = guard(tmp_path, disk, clock)
    await subject.refresh()
    disk.free_bytes = 10 * MIB

    # Within the interval: no statvfs at all, whatever the traffic.
    assert all(subject.admitting() for _ in range(1000))
    assert len(disk.paths) == 1

    clock.now += 5.0
    # Stale: this answer is still the cached one, and exactly one refresh starts.
    assert all(subject.admitting() for _ in range(1000))
    await subject.aclose()
    assert len(disk.paths) == 2
    assert not subject.admitting()
    assert threading.get_ident() not in disk.threads


async def test_the_first_request_admits_and_starts_a_measurement(tmp_path: Path) -> None:
    disk, clock = FakeDisk(1 * MIB), Clock()
    subject = guard(tmp_path, disk, clock)

    assert subject.admitting()
    await subject.aclose()
    assert disk.paths == [str(tmp_path)]
    assert not subject.admitting()


async def test_a_failing_statvfs_admits_and_is_counted(tmp_path: Path) -> None:
    disk, clock = FakeDisk(1 * MIB), Clock()
    subject = guard(tmp_path, disk, clock)
    assert not await subject.refresh()

    disk.error = OSError("stale file handle")
    assert await subject.refresh()
    assert subject.admitting()
    assert subject.errors == 1


async def test_a_volume_folder_not_made_yet_is_measured_on_its_parent(tmp_path: Path) -> None:
    disk, clock = FakeDisk(500 * MIB), Clock()
    subject = DiskGuard(tmp_path / "var" / "volume", MIB, statvfs=disk, clock=clock)

    assert await subject.refresh()
    assert disk.paths == [str(tmp_path)]


@pytest.mark.parametrize(
    "settings",
    [
        VolumeSettings(kind="local", min_free_bytes=0),
        VolumeSettings(kind="databricks", path="/Volumes/main/default/tts"),
        VolumeSettings(kind="none"),
    ],
)
async def test_without_a_local_minimum_it_always_admits_and_never_measures(
    settings: VolumeSettings,
) -> None:
    disk = FakeDisk(0)
    subject = DiskGuard.from_settings(settings, statvfs=disk)

    assert not subject.enabled
    assert subject.admitting()
    assert await subject.refresh()
    await subject.aclose()
    assert disk.paths == []


def test_from_settings_guards_a_local_volume(tmp_path: Path) -> None:
    subject = DiskGuard.from_settings(
        VolumeSettings(kind="local", path=str(tmp_path), min_free_bytes=MIB)
    )
    assert subject.enabled
    assert subject.min_free_bytes == MIB
    assert subject.path == tmp_path


def test_invalid_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DiskGuard(tmp_path, -1)
    with pytest.raises(ValueError):
        DiskGuard(tmp_path, 1, check_interval_seconds=0)
