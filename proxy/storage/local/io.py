"""The local Volume's I/O: its threads, its per-key locks and its file primitives."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import stat
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from proxy.speak import CacheKey
from proxy.storage.entry import EntryMeta
from proxy.storage.layout import (
    MAX_SIDECAR_BYTES,
    TMP_PREFIX,
    is_object_of,
    object_names,
    parse_sidecar,
    sidecar_name,
)
from proxy.storage.local.commit import SYNCS_EACH_FILE, GroupCommit, Publish, Stage

T = TypeVar("T")

READ_THREADS: Final = 4
BACKGROUND_THREADS: Final = 2
# How much lower the background threads' CPU priority is than the event loop's (nice steps).
BACKGROUND_NICE: Final = 10
LOCK_STRIPES: Final = 64
FOLDERS_REMEMBERED: Final = 4_096


class KeyLocks:
    """Striped thread locks that serialise operations on one key in this process.

    A reader must not see an old sidecar beside a new object (and then remove both as corrupt).
    The locks are taken inside the worker thread: a cancelled await does not release a lock a
    thread holds.
    """

    def __init__(self, stripes: int = LOCK_STRIPES) -> None:
        self._stripes = tuple(threading.Lock() for _ in range(stripes))

    def of(self, key: CacheKey) -> threading.Lock:
        """The lock of `key`'s stripe."""
        return self._stripes[hash(key) % len(self._stripes)]


class MessageFolders:
    """Message folders checked to be under the Volume's root, remembered: resolving a path is a
    system call per component, and every write and hit needs its folder."""

    def __init__(self, root: Path, base: Path, *, remembered: int = FOLDERS_REMEMBERED) -> None:
        self.root = root
        self.base = base
        self._limit = remembered
        self._folders: dict[tuple[str, str, str], Path] = {}
        self._parents: dict[tuple[str, str], Path] = {}

    def known(self, parts: tuple[str, str, str]) -> bool:
        """True when the folder of these ids was checked before."""
        return parts in self._folders

    def remembered(self, key: CacheKey) -> Path:
        """`checked(key)`, from what was checked before when it was."""
        parts = (key.user, key.thread_id, key.message_id)
        folder = self._folders.get(parts)
        if folder is None:
            folder = self.checked(key)
            if len(self._folders) >= self._limit:
                self._folders.clear()
            self._folders[parts] = folder
        return folder

    def checked(self, key: CacheKey) -> Path:
        """The key's message folder, checked to be under the root.

        Its thread folder is resolved (every component, links followed, checked) once and
        remembered; the message's own component is checked on each call: one lstat rather than
        one per component of the whole path. A missing folder is made by mkdir, which never
        follows a link.
        """
        parent_key = (key.user, key.thread_id)
        parent = self._parents.get(parent_key)
        if parent is None:
            parent = resolve_under(self.root, self.base / key.user / key.thread_id)
            if len(self._parents) >= self._limit:
                self._parents.clear()
            self._parents[parent_key] = parent
        folder = parent / key.message_id
        try:
            linked = stat.S_ISLNK(os.lstat(folder).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return folder
        return resolve_under(self.root, folder) if linked else folder


class VolumeThreads:
    """Where the local Volume's blocking work runs: read threads, the writes' commit thread, and
    background threads for deletes and walks.

    Reads get threads of their own: a hit or a miss's lookup must not queue behind writes waiting
    for their sync, nor behind the janitor's walks. Entry writes go to one thread that makes them
    durable in batches (GroupCommit). Deletes and walks are background work: their threads run at
    a lower CPU priority, so that a walk of a large Volume does not keep the event loop waiting.
    """

    def __init__(self) -> None:
        self._read_pool = ThreadPoolExecutor(
            max_workers=READ_THREADS, thread_name_prefix="volume-read"
        )
        self.commits = GroupCommit()
        self._background_pool = ThreadPoolExecutor(
            max_workers=BACKGROUND_THREADS,
            thread_name_prefix="volume-background",
            initializer=lower_thread_priority,
        )

    async def read(self, work: Callable[..., T], *args: Any) -> T:
        """`work` in a read thread (a lookup, a hit's read)."""
        return await _run_in(self._read_pool, work, *args)

    async def write(self, stage: Stage) -> None:
        """An entry write, staged by `stage` in the commit thread; done once it is durable."""
        await self.commits.write(stage)

    async def background(self, work: Callable[..., T], *args: Any) -> T:
        """`work` in a low-priority background thread (deletes, walks)."""
        return await _run_in(self._background_pool, work, *args)

    async def aclose(self) -> None:
        """Let queued work finish, then stop the threads."""
        await self.commits.aclose()
        for pool in (self._read_pool, self._background_pool):
            await asyncio.to_thread(pool.shutdown, wait=True)


async def _run_in(pool: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, work, *args)


def lower_thread_priority(steps: int = BACKGROUND_NICE) -> None:
    """Raise the calling thread's nice value by `steps` (Linux, where each thread has its own)."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))


# File primitives: each is called from a worker thread.


def resolve_under(root: Path, path: Path) -> Path:
    """`path` resolved (links followed); ValueError when that leaves `root`."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError("path escapes the volume root")
    return resolved


def make_folder(folder: str) -> bool:
    """Create a message folder (and its parents when missing); True when it was new."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        return False
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return True


# Temporary names: a random stem per process and a counter, so that naming a file costs no
# system call; O_EXCL refuses a name that exists all the same (a leftover), and the next is tried.
_temporary_stem = ""
_temporary_numbers = itertools.count()


def _new_stem() -> None:
    global _temporary_stem, _temporary_numbers
    _temporary_stem = f"{TMP_PREFIX}{secrets.token_hex(6)}-"
    _temporary_numbers = itertools.count()


_new_stem()
os.register_at_fork(after_in_child=_new_stem)


def write_new(folder: str, data: bytes, *, sync: bool) -> str:
    """`data` in a new temporary file in `folder` (synced to disk when `sync`); returns its path."""
    while True:
        path = os.path.join(folder, f"{_temporary_stem}{next(_temporary_numbers):x}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        discard(path)
        raise
    os.close(fd)
    return path


def read_file_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than `limit`."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size > limit:
            return None
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def stage_entry(
    folder: Path, voice: str, name: str, body: bytes, sidecar: bytes, lock: threading.Lock
) -> Publish:
    """Write an entry's object and sidecar under temporary names in `folder`; the returned step
    renames them into place under the key's `lock` (GroupCommit then syncs the batch)."""
    where = str(folder)
    created = make_folder(where)
    object_tmp = write_new(where, body, sync=SYNCS_EACH_FILE)
    try:
        sidecar_tmp = write_new(where, sidecar, sync=SYNCS_EACH_FILE)
    except BaseException:
        discard(object_tmp)
        raise

    def publish() -> str:
        # Object first, sidecar last: a reader never sees a sidecar before its object. The lock
        # keeps a reader from seeing the new object beside the old sidecar (and removing both).
        with lock:
            try:
                os.replace(object_tmp, os.path.join(where, name))
                os.replace(sidecar_tmp, os.path.join(where, sidecar_name(voice)))
            except BaseException:
                discard(object_tmp)
                discard(sidecar_tmp)
                raise
            if not created:
                remove_other_objects(where, voice, keep=name)
        return where

    return publish


def discard(path: str) -> None:
    """Remove the file at `path`, if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def unlink_counted(path: Path) -> int:
    """Remove the file at `path`: 1 when it went, 0 when it was not there."""
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return 0
    return 1


def folder_writable(root: Path) -> bool:
    """True when the Volume folder (or, before its first write, its nearest parent) is writable."""
    path = root
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def load_sidecar(folder: Path, key: CacheKey) -> tuple[bool, tuple[EntryMeta, str] | None]:
    """(whether a sidecar file is there, its parsed content when it is valid for `key`)."""
    try:
        raw = read_file_bounded(folder / sidecar_name(key.voice), MAX_SIDECAR_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return False, None
    return True, parse_sidecar(raw, key) if raw is not None else None


def remove_entry(folder: Path, voice: str) -> None:
    """Remove one entry's sidecar and its objects in every format, those that are there."""
    # Sidecar first: from then on a reader sees a miss, whatever objects remain.
    with contextlib.suppress(NotADirectoryError):
        (folder / sidecar_name(voice)).unlink(missing_ok=True)
        for name in object_names(voice):
            (folder / name).unlink(missing_ok=True)


def remove_other_objects(folder: str, voice: str, keep: str) -> None:
    """Remove the objects of `voice` in another format than `keep` (its content type changed)."""
    for name in os.listdir(folder):
        if name != keep and is_object_of(name, voice):
            discard(os.path.join(folder, name))
