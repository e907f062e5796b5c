"""DiskGuard: pause admission to a local Volume while its disk is nearly full."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from proxy.config import VolumeSettings

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL_SECONDS = 5.0


class FsStats(Protocol):
    """The part of `os.statvfs_result` the guard reads."""

    @property
    def f_bavail(self) -> int:
        """Blocks available to an unprivileged writer."""
        ...

    @property
    def f_frsize(self) -> int:
        """The size of one block in bytes."""
        ...


Statvfs = Callable[[str], FsStats]


class DiskGuard:
    """Says whether a new entry may be written, from a free-space figure refreshed off the loop.

    `admitting()` never makes a syscall: it answers from the last measurement and, when that is
    older than the check interval, starts one refresh in a worker thread. Until a first
    measurement (or when measuring fails) it admits: the guard only stops filling a disk, it
    must not switch the cache off because it cannot tell.
    """

    def __init__(
        self,
        path: str | Path,
        min_free_bytes: int,
        *,
        check_interval_seconds: float = DEFAULT_CHECK_INTERVAL_SECONDS,
        statvfs: Statvfs = os.statvfs,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_free_bytes < 0:
            raise ValueError("min_free_bytes must be 0 or more")
        if check_interval_seconds <= 0:
            raise ValueError("check_interval_seconds must be greater than 0")
        self.path = Path(path)
        self.min_free_bytes = min_free_bytes
        self.check_interval_seconds = check_interval_seconds
        self.free_bytes: int | None = None
        self.errors = 0
        self._statvfs = statvfs
        self._clock = clock
        self._admitting = True
        self._checked_at: float | None = None
        self._refresh: asyncio.Task[bool] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: VolumeSettings,
        *,
        check_interval_seconds: float = DEFAULT_CHECK_INTERVAL_SECONDS,
        statvfs: Statvfs = os.statvfs,
    ) -> DiskGuard:
        """A guard for the configured Volume; only a local one is measured, others always admit."""
        minimum = settings.min_free_bytes if settings.kind == "local" else 0
        return cls(
            settings.path,
            minimum,
            check_interval_seconds=check_interval_seconds,
            statvfs=statvfs,
        )

    @property
    def enabled(self) -> bool:
        """False when there is nothing to guard (min_free_bytes is 0 or the Volume is not local)."""
        return self.min_free_bytes > 0

    def admitting(self) -> bool:
        """True while new entries may be stored; cheap enough for every request."""
        if not self.enabled:
            return True
        checked = self._checked_at
        if checked is None or self._clock() - checked >= self.check_interval_seconds:
            self._start_refresh()
        return self._admitting

    async def refresh(self) -> bool:
        """Measure the free space now (in a thread) and return whether entries are admitted."""
        if not self.enabled:
            return True
        # Stamped before measuring, so a slow filesystem is not asked again by every request.
        self._checked_at = self._clock()
        try:
            free = await asyncio.to_thread(self._measure)
        except OSError as exc:
            self.errors += 1
            log.warning("disk guard cannot measure free space: %s", type(exc).__name__)
            self._admitting = True
            return True
        self.free_bytes = free
        self._update(free >= self.min_free_bytes)
        return self._admitting

    async def aclose(self) -> None:
        """Wait for a refresh still running in its thread."""
        refresh = self._refresh
        if refresh is not None and not refresh.done():
            await asyncio.wait({refresh})

    def _start_refresh(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # The reference keeps the task alive until it ends.
        self._refresh = loop.create_task(self.refresh())

    def _measure(self) -> int:
        # The Volume folder appears with the first write; until then its disk is its parent's.
        path = self.path
        while not path.exists() and path.parent != path:
            path = path.parent
        stats = self._statvfs(str(path))
        return int(stats.f_bavail) * int(stats.f_frsize)

    def _update(self, admitting: bool) -> None:
        if admitting == self._admitting:
            return
        self._admitting = admitting
        if admitting:
            log.info(
                "disk free space is back above %d bytes: admission resumed", self.min_free_bytes
            )
        else:
            log.warning(
                "disk free space %s is below %d bytes: admission paused",
                self.free_bytes,
                self.min_free_bytes,
            )
