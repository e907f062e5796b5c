"""GroupCommit: the local Volume's entry writes, by one thread, made durable one sync per batch."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Final

# A write's second phase: it moves the staged files into place and returns the folder it wrote.
Publish = Callable[[], str]
# A write's first phase: it writes the files under temporary names and returns the second phase.
Stage = Callable[[], Publish]

# The most writes one sync covers; more waiting go to the next batch.
MAX_BATCH: Final = 64


class GroupCommit:
    """Entry writes staged, published and synced in batches by one thread.

    Each batch: every write stages its files (temporary names, no sync), then publishes them
    (renames, under the key's lock), then one sync makes the whole batch durable, and only then
    is each write reported done (so what is recorded after a write, an index row, a notice to
    other processes, is on disk). A lone write is a batch of one; writes that arrive while a
    batch is being synced form the next one, so the syncs per entry fall as the load rises.

    A crash before the sync may leave a published entry whose object's bytes never reached the
    disk: every first read of an entry checks the object's length and sha256 against its
    sidecar, so such an entry is removed and missed, never served.
    """

    def __init__(self, *, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch
        self.batches = 0
        self.entries = 0
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def write(self, stage: Stage) -> None:
        """Stage, publish and sync one write with whatever else is waiting; done when durable."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._start()
        self._queue.put(_Write(stage, loop, done))
        await done

    async def aclose(self) -> None:
        """Finish the writes queued, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="volume-commit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Write]) -> None:
        published: list[tuple[_Write, str]] = []
        for write in batch:
            try:
                publish = write.stage()
                published.append((write, publish()))
            except BaseException as exc:
                write.settle(exc)
        if not published:
            return
        try:
            sync_filesystems(folder for _, folder in published)
        except OSError as exc:
            for write, _ in published:
                write.settle(exc)
            return
        self.batches += 1
        self.entries += len(published)
        for write, _ in published:
            write.settle(None)


class _Write:
    __slots__ = ("done", "loop", "stage")

    def __init__(
        self, stage: Stage, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]
    ) -> None:
        self.stage = stage
        self.loop = loop
        self.done = done

    def settle(self, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            self.loop.call_soon_threadsafe(_settle, self.done, error)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # cancelled: the caller stopped waiting
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2) from the C library, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_SYNCFS: Final = _syncfs()
# Writes stage their files synced one by one where no filesystem-wide sync exists.
SYNCS_EACH_FILE: Final = _SYNCFS is None


def sync_filesystems(folders: Iterable[str]) -> None:
    """Make everything written under `folders` durable: syncfs(2) once per filesystem they are
    on; where there is no syncfs, each folder's names (their files were synced one by one)."""
    distinct = list(dict.fromkeys(folders))
    if _SYNCFS is None:
        for folder in distinct:
            fsync_dir(folder)
        return
    by_device: dict[int, str] = {}
    for folder in distinct:
        by_device.setdefault(os.stat(folder).st_dev, folder)
    for folder in by_device.values():
        fd = os.open(folder, os.O_RDONLY)
        try:
            if _SYNCFS(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error))
        finally:
            os.close(fd)


def fsync_dir(folder: str) -> None:
    """Make the names in `folder` durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        # Some filesystems refuse fsync on a directory; the renames themselves have happened.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
