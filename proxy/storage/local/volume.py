"""LocalVolume: the durable tier on a local folder, written atomically and verified on read."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final, NamedTuple

from proxy.config import VolumeSettings
from proxy.speak import CacheKey
from proxy.storage.breaker import BreakerState, CircuitBreaker
from proxy.storage.entry import Entry, EntryInfo, EntryMeta
from proxy.storage.guard import guarded
from proxy.storage.layout import (
    encode_sidecar,
    object_name,
    prefix_parts,
    prefix_segments,
    require_valid,
    sidecar_name,
)
from proxy.storage.local import maintenance
from proxy.storage.local.commit import Publish
from proxy.storage.local.io import (
    KeyLocks,
    MessageFolders,
    VolumeThreads,
    folder_writable,
    load_sidecar,
    read_file_bounded,
    remove_entry,
    stage_entry,
)
from proxy.storage.tiers import CallStats, CorruptEntry

_VERIFIED_CACHE: Final = 4_096
_HIT_PRECISION_SECONDS: Final = 60.0
# The largest read buffer get_nowait keeps between hits.
_SCRATCH_LIMIT: Final = 2 * 1024 * 1024
_NOWAIT: Final[int | None] = getattr(os, "RWF_NOWAIT", None)


class LocalVolume:
    """The durable tier on a local folder.

    Layout (`proxy.storage.layout`) under `{root}/{prefix}`. Ids are validated before they become
    path segments, and every path is checked to stay under the root. The sidecar is written after
    its object, so it never names an incomplete object. A lookup (one thread's read of sidecar
    and body, checked) is bounded by the lookup budget, a write by `timeout_seconds`, both behind
    the breaker (a hung mount costs the budget on a few requests, then nothing).
    """

    name = "volume"
    kind = "local"

    def __init__(
        self,
        root: str | Path,
        prefix: str = "tts_audio",
        *,
        lookup_budget_seconds: float = VolumeSettings.lookup_budget_ms / 1000,
        timeout_seconds: float = VolumeSettings.timeout_seconds,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        segments = prefix_segments(prefix)
        self.root = Path(root).resolve()
        self.prefix = prefix
        self.base = self.root.joinpath(*segments)
        self.lookup_budget_seconds = lookup_budget_seconds
        self.timeout_seconds = timeout_seconds
        self.breaker = breaker or CircuitBreaker(
            VolumeSettings.failure_threshold, VolumeSettings.cooldown_seconds
        )
        self._corrupt = 0
        self._locks = KeyLocks()
        self._threads = VolumeThreads()
        self._orphan_walk = maintenance.OrphanWalk(self.base)
        # Folders checked once (resolving walks every path component with a syscall).
        self._folders = MessageFolders(self.root, self.base)
        # What was verified, by the file identities it was verified on: a hit whose sidecar and
        # object are still those files (same inode, size, mtime) skips re-hashing the body.
        # Writes replace files by rename, so any rewrite shows up as another inode.
        self._verified: dict[CacheKey, _Verified] = {}
        self._last_hit_recorded: dict[CacheKey, float] = {}
        # get_nowait's read buffer, as large as the largest entry read on the loop so far.
        self._scratch = bytearray()

    @property
    def breaker_state(self) -> BreakerState:
        """closed, open or half-open."""
        return self.breaker.state

    @property
    def corrupt_entries(self) -> int:
        """Entries found corrupt by a read since start (each removed)."""
        return self._corrupt

    @property
    def walkable(self) -> bool:
        """True: the folder is listed without anyone's token."""
        return True

    def describe(self) -> str:
        """The Volume's kind and health, in words, for the dashboard."""
        return f"local folder, breaker {self.breaker.state}"

    def call_stats(self) -> CallStats:
        """Empty: a local folder makes no API calls."""
        return CallStats({}, 0.0)

    def get_nowait(self, key: CacheKey) -> Entry | None:
        """A hit read on the event loop, only when it cannot block; None means "ask get()".

        Only entries verified before qualify (their folder and files are in the kernel's
        caches), and the body is read with RWF_NOWAIT: data not in the page cache makes the
        read fail at once instead of waiting for the disk.
        """
        known = self._verified.get(key)
        if known is None or _NOWAIT is None or self.breaker.state != "closed":
            return None
        length = known.meta.length
        try:
            sidecar = os.stat(known.sidecar_path)
            fd = os.open(known.object_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if (sidecar.st_ino, sidecar.st_size) != known.sidecar:
                return None
            if _identity(os.fstat(fd)) != known.object:
                return None
            # Into one reused buffer (this runs on the event loop only), then one copy out:
            # a fresh bytearray per hit would be zeroed first, and at 1 MiB mapped page by page.
            scratch = self._scratch
            if len(scratch) < length:
                scratch = bytearray(length)
                if length <= _SCRATCH_LIMIT:  # larger entries are rare: no buffer kept for them
                    self._scratch = scratch
            with memoryview(scratch)[:length] as window:
                if os.preadv(fd, [window], 0, _NOWAIT) != length:
                    return None
                body = window.tobytes()
        except OSError:
            return None  # EAGAIN: not in the page cache; the thread will wait for the disk
        finally:
            os.close(fd)
        if time.monotonic() - self._last_hit_recorded.get(key, -_HIT_PRECISION_SECONDS) >= (
            _HIT_PRECISION_SECONDS
        ):
            return None  # time to record a hit: that write belongs in the thread
        return Entry(known.meta, body)

    def location(self, key: CacheKey, content_type: str) -> str:
        """Where the object for `key` lives (what the index and legacy metadata record)."""
        require_valid(key)
        return str(self._folder(key) / object_name(key, content_type))

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry under `key`, or None; a corrupt or malformed entry is removed and missed."""
        require_valid(key)
        read = functools.partial(self._threads.read, self._get_sync, key)
        try:
            return await guarded(self.breaker, self.lookup_budget_seconds, read)
        except CorruptEntry:
            self._corrupt += 1
            return None

    async def open(self, key: CacheKey) -> Entry | None:
        """The same as get: a local read is whole, never streamed."""
        return await self.get(key)

    async def read_meta(self, key: CacheKey) -> EntryMeta | None:
        """The sidecar's metadata without the body; None when absent or malformed (kept as is)."""
        require_valid(key)
        return await self._threads.read(self._read_meta_sync, key)

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`: object first, sidecar last, each replaced atomically."""
        require_valid(key)
        write = functools.partial(self._threads.write, functools.partial(self._stage, key, entry))
        await guarded(self.breaker, self.timeout_seconds, write)

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        require_valid(key)
        await self._threads.background(self._delete_sync, key)

    async def exists(self, key: CacheKey) -> bool:
        """True when `key` has a valid sidecar and an object of the length it records."""
        require_valid(key)
        return await self._threads.read(self._exists_sync, key)

    async def ping(self) -> bool:
        """True when the folder (or, before its first write, its nearest parent) is writable."""
        return await asyncio.to_thread(folder_writable, self.root)

    async def delete_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Remove a user's, a thread's or a message's entries; return how many entries went."""
        parts = prefix_parts(user, thread_id, message_id)
        return await self._threads.background(
            maintenance.delete_prefix, self.root, self.base, parts
        )

    async def list_entries(
        self,
        user: str | None = None,
        thread_id: str | None = None,
        message_id: str | None = None,
    ) -> AsyncIterator[EntryInfo]:
        """Every entry under the base, a user, a thread or a message, with scan's figures."""
        if user is not None:
            prefix_parts(user, thread_id, message_id)
        elif thread_id is not None or message_id is not None:
            raise ValueError("thread_id and message_id need user")
        found = await self._threads.background(
            maintenance.scan, self.base, user, thread_id, message_id
        )
        for info in found:
            yield info

    async def scan(self) -> list[EntryInfo]:
        """Every entry with an object: created = object mtime, last hit = sidecar mtime."""
        return await self._threads.background(maintenance.scan, self.base)

    async def record_hits(self, hits: Mapping[CacheKey, float]) -> bool:
        """Move the sidecars' mtimes forward to hits seen elsewhere (memory); True: kept here."""
        await self._threads.background(maintenance.record_hits, self.root, self.base, dict(hits))
        return True

    async def clean_leftovers(self) -> int:
        """Remove temporary files a crash left behind; return how many."""
        return await self._threads.background(maintenance.clean_leftovers, self.base)

    async def clean_orphans(self, *, limit: int, older_than: float) -> int:
        """Remove up to `limit` crash leftovers last changed before `older_than`, looking in the
        next `limit` folders of a walk that resumes each call; return how many went.

        What counts as a leftover, and what is left alone: `maintenance.OrphanWalk`.
        """
        return await self._threads.background(
            self._orphan_walk.clean, self._locks, limit, older_than
        )

    async def aclose(self) -> None:
        """Let queued operations finish, then stop the threads."""
        await self._threads.aclose()

    # Everything below runs in a worker thread.

    def _folder(self, key: CacheKey) -> Path:
        """The key's message folder, checked to be under the root (MessageFolders.checked)."""
        return self._folders.checked(key)

    def _entry_folder(self, key: CacheKey) -> Path:
        """The key's message folder, from the folders checked before."""
        return self._folders.remembered(key)

    def _get_sync(self, key: CacheKey) -> Entry | None:
        parts = (key.user, key.thread_id, key.message_id)
        if not self._folders.known(parts) and not os.path.lexists(
            os.path.join(self.base, *parts, sidecar_name(key.voice))
        ):
            # A miss, told by one stat: resolving (and checking) the folder, a syscall per
            # path component, is for entries that are there.
            return None
        folder = self._entry_folder(key)
        with self._locks.of(key):
            known = self._verified.get(key)
            if known is not None:
                entry = self._reread(folder, key, known)
                if entry is not None:
                    return entry
                self._verified.pop(key, None)
            present, parsed = load_sidecar(folder, key)
            if parsed is None:
                if present:
                    remove_entry(folder, key.voice)
                    raise CorruptEntry("malformed sidecar: removed")
                return None
            meta, name = parsed
            try:
                body = read_file_bounded(folder / name, meta.length)
            except FileNotFoundError:
                remove_entry(folder, key.voice)  # torn: a sidecar without its object
                return None
            entry = Entry(meta, body) if body is not None else None
            if entry is None or not entry.intact():
                remove_entry(folder, key.voice)
                raise CorruptEntry("object disagrees with its sidecar: removed")
            self._remember(folder, key, meta, name)
            self._note_hit(folder, key)
            return entry

    def _reread(self, folder: Path, key: CacheKey, known: _Verified) -> Entry | None:
        """The entry again, when its sidecar and object are the very files verified before."""
        try:
            sidecar = os.stat(known.sidecar_path)
            with open(known.object_path, "rb") as handle:
                status = os.fstat(handle.fileno())
                if (sidecar.st_ino, sidecar.st_size) != known.sidecar or _identity(
                    status
                ) != known.object:
                    return None
                body = handle.read(known.meta.length + 1)
        except OSError:
            return None
        if len(body) != known.meta.length:
            return None
        self._note_hit(folder, key)
        return Entry(known.meta, body)

    def _remember(self, folder: Path, key: CacheKey, meta: EntryMeta, name: str) -> None:
        sidecar_path = str(folder / sidecar_name(key.voice))
        object_path = str(folder / name)
        try:
            sidecar = os.stat(sidecar_path)
            status = os.stat(object_path)
        except OSError:
            return
        if len(self._verified) >= _VERIFIED_CACHE:
            self._verified.clear()
        self._verified[key] = _Verified(
            meta,
            object_path,
            sidecar_path,
            (sidecar.st_ino, sidecar.st_size),
            _identity(status),
        )

    def _note_hit(self, folder: Path, key: CacheKey) -> None:
        # The janitor reads the sidecar's mtime as the last hit; a minute's precision is plenty,
        # and it spares a syscall on most hits.
        now = time.monotonic()
        if now - self._last_hit_recorded.get(key, -_HIT_PRECISION_SECONDS) < _HIT_PRECISION_SECONDS:
            return
        if len(self._last_hit_recorded) >= _VERIFIED_CACHE:
            self._last_hit_recorded.clear()
        self._last_hit_recorded[key] = now
        _record_hit(folder / sidecar_name(key.voice))

    def _stage(self, key: CacheKey, entry: Entry) -> Publish:
        # The body is not hashed again here: every first read checks it against the sidecar.
        folder = self._entry_folder(key)
        name, sidecar_bytes = encode_sidecar(key, entry.meta)
        return stage_entry(folder, key.voice, name, entry.body, sidecar_bytes, self._locks.of(key))

    def _delete_sync(self, key: CacheKey) -> None:
        folder = self._folder(key)
        with self._locks.of(key):
            remove_entry(folder, key.voice)

    def _exists_sync(self, key: CacheKey) -> bool:
        folder = self._folder(key)
        with self._locks.of(key):
            _, parsed = load_sidecar(folder, key)
            if parsed is None:
                return False
            meta, name = parsed
            try:
                return (folder / name).stat().st_size == meta.length
            except (FileNotFoundError, NotADirectoryError):
                return False

    def _read_meta_sync(self, key: CacheKey) -> EntryMeta | None:
        folder = self._folder(key)
        with self._locks.of(key):
            _, parsed = load_sidecar(folder, key)
        return parsed[0] if parsed is not None else None


class _Verified(NamedTuple):
    meta: EntryMeta
    object_path: str  # strings, not Paths: joined once, not on every hit
    sidecar_path: str
    sidecar: tuple[int, int]  # inode, size: its mtime moves with every recorded hit
    object: tuple[int, int, int]  # inode, size, mtime in ns


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    return status.st_ino, status.st_size, status.st_mtime_ns


def _record_hit(sidecar: Path) -> None:
    # The sidecar's mtime is the entry's last hit: one syscall in the thread already reading it,
    # and the object's own mtime stays its creation time. A read-only Volume still serves.
    with contextlib.suppress(OSError):
        os.utime(sidecar)
