"""LocalVolume: entries as files in a local folder, written atomically, verified on read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from proxy.speak import CacheKey, valid_id
from proxy.storage.entry import Entry, EntryMeta

_EXTENSIONS = {
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/ogg": "ogg",
    "audio/opus": "opus",
    "audio/flac": "flac",
    "audio/aac": "aac",
    "audio/webm": "webm",
}
OBJECT_EXTENSIONS = frozenset({*_EXTENSIONS.values(), "bin"})
SIDECAR_SUFFIX = ".meta.json"
TMP_PREFIX = ".tmp-"
# A sidecar is a few hundred bytes; anything far larger is not one of ours.
_MAX_SIDECAR_BYTES = 1_048_576
_LOCK_STRIPES = 64
T = TypeVar("T")
_FOLDER_CACHE = 4_096
_VERIFIED_CACHE = 4_096
_HIT_PRECISION_SECONDS = 60.0
# The largest read buffer get_nowait keeps between hits.
_SCRATCH_LIMIT = 2 * 1024 * 1024
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
# How long the event loop waits for a read thread's answer before awaiting it instead, and how
# long it then awaits at once (see LocalVolume._read).
READ_WAIT_SECONDS = 0.0005
READ_WAIT_BACKOFF_SECONDS = 1.0
_WRITE_THREADS = 4
# How much lower the write threads' CPU priority is than the event loop's (nice steps).
BACKGROUND_NICE = 10


@dataclass(frozen=True, slots=True)
class StoredEntryInfo:
    """One stored entry as the janitor sees it: its key, its size and when it was made and hit."""

    key: CacheKey
    bytes: int
    created_at: float
    last_hit_at: float


def extension_for(content_type: str) -> str:
    """The object file extension for a content type ("bin" when unknown)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return _EXTENSIONS.get(media_type, "bin")


class LocalVolume:
    """The durable tier on a local folder.

    Layout: `{root}/{prefix}/{user}/{thread}/{message}/{voice}.{ext}` beside `{voice}.meta.json`.
    Ids are validated before they become path segments, and every path is checked to stay under
    the root. The sidecar is written after its object, so it never names an incomplete object.
    """

    name = "volume"

    def __init__(self, root: str | Path, prefix: str = "tts_audio") -> None:
        segments = prefix.split("/")
        if not all(valid_id(segment) for segment in segments):
            raise ValueError(f"invalid volume prefix: {prefix!r}")
        self.root = Path(root).resolve()
        self.prefix = prefix
        self.base = self.root.joinpath(*segments)
        # Striped thread locks, taken inside the worker thread, serialise operations on one key
        # in this process: a reader must not see an old sidecar beside a new object (and then
        # remove both as corrupt), and a cancelled await does not release a lock a thread holds.
        self._stripes = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))
        # Folders resolved once (resolving walks every path component with a syscall).
        self._folders: dict[tuple[str, str, str], Path] = {}
        # What was verified, by the file identities it was verified on: a hit whose sidecar and
        # object are still those files (same inode, size, mtime) skips re-hashing the body.
        # Writes replace files by rename, so any rewrite shows up as another inode.
        self._verified: dict[CacheKey, _Verified] = {}
        self._last_hit_recorded: dict[CacheKey, float] = {}
        # get_nowait's read buffer, as large as the largest entry read on the loop so far.
        self._scratch = bytearray()
        # Reads get threads of their own: a hit or a miss's lookup must not queue behind writes
        # waiting for fsync, nor behind the janitor's walks.
        self._read_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="volume-read")
        self._wait_again_at = 0.0
        # Writes (and the janitor's walks) are background work: their threads run at a lower CPU
        # priority, so that on a busy CPU the event loop, serving, is not kept waiting by them.
        self._write_pool = ThreadPoolExecutor(
            max_workers=_WRITE_THREADS,
            thread_name_prefix="volume-write",
            initializer=lower_thread_priority,
        )
        # But on a CPU kept busy, low-priority writes would fall behind for good (and the write
        # backlog would then skip entries): writes past what those threads have in hand go to
        # threads of normal priority.
        self._catch_up_pool = ThreadPoolExecutor(
            max_workers=_WRITE_THREADS, thread_name_prefix="volume-write-now"
        )
        self._writes_in_hand = 0

    def get_nowait(self, key: CacheKey) -> Entry | None:
        """A hit read on the event loop, only when it cannot block; None means "ask get()".

        Only entries verified before qualify (their folder and files are in the kernel's
        caches), and the body is read with RWF_NOWAIT: data not in the page cache makes the
        read fail at once instead of waiting for the disk.
        """
        known = self._verified.get(key)
        if known is None or _NOWAIT is None:
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
        _require_valid(key)
        folder = self._folder(key.user, key.thread_id, key.message_id)
        return str(folder / f"{key.voice}.{extension_for(content_type)}")

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry under `key`, or None; a corrupt or malformed entry is removed and missed."""
        _require_valid(key)
        return await self._read(self._get_sync, key)

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`: object first, sidecar last, each replaced atomically."""
        _require_valid(key)
        if self._writes_in_hand >= _WRITE_THREADS:
            await self._in(self._catch_up_pool, self._put_sync, key, entry)
            return
        self._writes_in_hand += 1
        try:
            await self._in(self._write_pool, self._put_sync, key, entry)
        finally:
            self._writes_in_hand -= 1

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        _require_valid(key)
        await self._in(self._write_pool, self._delete_sync, key)

    async def delete_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Remove a user's, a thread's or a message's entries; return how many entries went."""
        if message_id is not None and thread_id is None:
            raise ValueError("message_id needs thread_id")
        parts = [part for part in (user, thread_id, message_id) if part is not None]
        if not all(valid_id(part) for part in parts):
            raise ValueError("invalid id")
        return await self._in(self._write_pool, self._delete_tree_sync, parts)

    async def clean_leftovers(self) -> int:
        """Remove temporary files a crash left behind; return how many."""
        return await self._in(self._write_pool, self._clean_leftovers_sync)

    async def exists(self, key: CacheKey) -> bool:
        """True when `key` has a valid sidecar and an object of the length it records."""
        _require_valid(key)
        return await self._in(self._read_pool, self._exists_sync, key)

    async def scan(self) -> list[StoredEntryInfo]:
        """Every entry with an object: created = object mtime, last hit = sidecar mtime."""
        return await self._in(self._write_pool, self._scan_sync)

    async def record_hits(self, hits: Mapping[CacheKey, float]) -> int:
        """Move the sidecars' mtimes forward to hits seen elsewhere (memory); return how many."""
        return await self._in(self._write_pool, self._record_hits_sync, dict(hits))

    async def clean_orphans(self, *, limit: int, older_than: float) -> int:
        """Remove up to `limit` crash leftovers last changed before `older_than`; return how many.

        Leftovers are temporary files, objects without a valid sidecar and sidecars without their
        object. Anything younger is left alone: it may be a write in progress in another process.
        Empty folders that old are pruned too (not counted).
        """
        return await self._in(self._write_pool, self._clean_orphans_sync, limit, older_than)

    async def aclose(self) -> None:
        """Let queued operations finish, then stop the threads."""
        for pool in (self._read_pool, self._write_pool, self._catch_up_pool):
            await asyncio.to_thread(pool.shutdown, wait=True)

    async def _in(self, pool: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, work, *args)

    async def _read(self, work: Callable[..., T], *args: Any) -> T:
        """A read in a read thread, its answer waited for on the loop for READ_WAIT_SECONDS.

        A read on a local folder mostly takes tens of microseconds (a miss is one lstat).
        Awaiting it costs two turns of the event loop, the thread's wake-up and then the
        loop's, which under load are most of a millisecond on a miss's time to first byte. So
        the loop waits for the answer, at most READ_WAIT_SECONDS (a bound on how long the loop
        can be held, like any short computation), then awaits it like any other. After a wait
        ran out (a cold disk), reads are awaited at once for a second.
        """
        future = self._read_pool.submit(work, *args)
        if time.monotonic() >= self._wait_again_at:
            try:
                return future.result(timeout=READ_WAIT_SECONDS)
            except FutureTimeout:
                self._wait_again_at = time.monotonic() + READ_WAIT_BACKOFF_SECONDS
        return await asyncio.wrap_future(future)

    # Everything below runs in a worker thread.

    def _folder(self, *parts: str) -> Path:
        path = self.base.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError("path escapes the volume root")
        return path

    def _lock(self, key: CacheKey) -> threading.Lock:
        return self._stripes[hash(key) % _LOCK_STRIPES]

    def _entry_folder(self, key: CacheKey) -> Path:
        parts = (key.user, key.thread_id, key.message_id)
        folder = self._folders.get(parts)
        if folder is None:
            folder = self._folder(*parts)
            if len(self._folders) >= _FOLDER_CACHE:
                self._folders.clear()
            self._folders[parts] = folder
        return folder

    def _get_sync(self, key: CacheKey) -> Entry | None:
        parts = (key.user, key.thread_id, key.message_id)
        if parts not in self._folders and not os.path.lexists(
            os.path.join(self.base, *parts, f"{key.voice}{SIDECAR_SUFFIX}")
        ):
            # A miss, told by one stat: resolving (and checking) the folder, a syscall per
            # path component, is for entries that are there.
            return None
        folder = self._entry_folder(key)
        with self._lock(key):
            known = self._verified.get(key)
            if known is not None:
                entry = self._reread(folder, key, known)
                if entry is not None:
                    return entry
                self._verified.pop(key, None)
            present, parsed = _load_sidecar(folder, key)
            if parsed is None:
                if present:
                    _remove_entry(folder, key.voice)
                return None
            meta, object_name = parsed
            try:
                body = _read_bounded(folder / object_name, meta.length)
            except FileNotFoundError:
                body = None
            entry = Entry(meta, body) if body is not None else None
            if entry is None or not entry.intact():
                _remove_entry(folder, key.voice)
                return None
            self._remember(folder, key, meta, object_name)
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

    def _remember(self, folder: Path, key: CacheKey, meta: EntryMeta, object_name: str) -> None:
        sidecar_path = str(folder / f"{key.voice}{SIDECAR_SUFFIX}")
        object_path = str(folder / object_name)
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
        _record_hit(folder / f"{key.voice}{SIDECAR_SUFFIX}")

    def _put_sync(self, key: CacheKey, entry: Entry) -> None:
        if not entry.intact():
            raise ValueError("entry body disagrees with its metadata")
        folder = self._entry_folder(key)
        extension = extension_for(entry.meta.content_type)
        object_name = f"{key.voice}.{extension}"
        sidecar = {
            **entry.meta.to_json(),
            "object": object_name,
            "key": _key_json(key),
        }
        sidecar_bytes = json.dumps(sidecar, separators=(",", ":")).encode()
        where = str(folder)
        with self._lock(key):
            created = _make_folder(where)
            # Both files are written and synced under temporary names, then renamed object first,
            # sidecar last (a reader never sees a sidecar before its object), then one folder
            # sync makes both names durable. After a crash between the renames and that sync, a
            # sidecar may have outlived its object's rename: the read verifies the object's length
            # and digest against the sidecar, so such an entry is removed and missed, not served.
            object_tmp = _write_synced(where, entry.body)
            try:
                sidecar_tmp = _write_synced(where, sidecar_bytes)
            except BaseException:
                _discard(object_tmp)
                raise
            try:
                os.replace(object_tmp, os.path.join(where, object_name))
                os.replace(sidecar_tmp, os.path.join(where, f"{key.voice}{SIDECAR_SUFFIX}"))
            except BaseException:
                _discard(object_tmp)
                _discard(sidecar_tmp)
                raise
            _fsync_dir(folder)
            if not created:
                _remove_other_objects(where, key.voice, keep=object_name)

    def _delete_sync(self, key: CacheKey) -> None:
        folder = self._folder(key.user, key.thread_id, key.message_id)
        with self._lock(key):
            _remove_entry(folder, key.voice)

    def _delete_tree_sync(self, parts: list[str]) -> int:
        target = self._folder(*parts)
        if not target.is_dir():
            return 0
        removed = sum(
            1
            for _, _, files in os.walk(target)
            for name in files
            if name.endswith(SIDECAR_SUFFIX) and not name.startswith(TMP_PREFIX)
        )
        shutil.rmtree(target)
        return removed

    def _clean_leftovers_sync(self) -> int:
        removed = 0
        for folder, _, files in os.walk(self.base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                        removed += 1
        return removed

    def _exists_sync(self, key: CacheKey) -> bool:
        folder = self._folder(key.user, key.thread_id, key.message_id)
        with self._lock(key):
            _, parsed = _load_sidecar(folder, key)
            if parsed is None:
                return False
            meta, object_name = parsed
            try:
                return (folder / object_name).stat().st_size == meta.length
            except (FileNotFoundError, NotADirectoryError):
                return False

    def _scan_sync(self) -> list[StoredEntryInfo]:
        found: list[StoredEntryInfo] = []
        for _, ids, files in self._message_folders():
            sidecars, objects, _ = split_names(files)
            for voice, sidecar in sidecars.items():
                names = objects.get(voice)
                key = CacheKey(*ids, voice)
                if not names or not key.valid():
                    continue
                created = max(files[name].st_mtime for name in names)
                found.append(
                    StoredEntryInfo(
                        key,
                        sum(files[name].st_size for name in names),
                        created_at=created,
                        last_hit_at=max(created, files[sidecar].st_mtime),
                    )
                )
        return found

    def _record_hits_sync(self, hits: dict[CacheKey, float]) -> int:
        recorded = 0
        for key, at in hits.items():
            if not key.valid():
                continue
            try:
                folder = self._folder(key.user, key.thread_id, key.message_id)
                sidecar = folder / f"{key.voice}{SIDECAR_SUFFIX}"
                if sidecar.stat().st_mtime < at:
                    os.utime(sidecar, (at, at))
                    recorded += 1
            except (OSError, ValueError):
                # Gone meanwhile, read-only, or a link out of the root: a hit is not worth more.
                continue
        return recorded

    def _clean_orphans_sync(self, limit: int, older_than: float) -> int:
        removed = 0
        for folder, ids, files in self._message_folders():
            if removed >= limit:
                break
            mtimes = {name: status.st_mtime for name, status in files.items()}
            sidecars, objects, temporary = split_names(mtimes)
            for name in temporary:
                if removed < limit and mtimes[name] < older_than:
                    removed += _unlink(folder / name)
            for voice in sorted(sidecars.keys() | objects.keys()):
                if removed >= limit:
                    break
                names = [*objects.get(voice, ()), sidecars.get(voice, "")]
                key = CacheKey(*ids, voice)
                if key.valid() and any(mtimes.get(name, older_than) < older_than for name in names):
                    removed += self._clean_voice(folder, key, older_than, limit - removed)
        _prune_empty_folders(self.base, older_than)
        return removed

    def _clean_voice(self, folder: Path, key: CacheKey, older_than: float, limit: int) -> int:
        """Remove one voice's leftovers, judged again under its lock from fresh stats."""
        with self._lock(key):
            mtimes: dict[str, float] = {}
            for name in (f"{key.voice}{SIDECAR_SUFFIX}", *_object_names(key.voice)):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    mtimes[name] = (folder / name).stat().st_mtime
            doomed = set(stale_names(mtimes, older_than))
            sidecar = f"{key.voice}{SIDECAR_SUFFIX}"
            if sidecar in mtimes and sidecar not in doomed and mtimes[sidecar] < older_than:
                doomed.update(self._invalid_against_sidecar(folder, key, mtimes, older_than))
            removed = 0
            # Sidecar first: from then on a reader sees a miss, whatever objects remain.
            for name in sorted(doomed, key=lambda name: not name.endswith(SIDECAR_SUFFIX)):
                if removed < limit:
                    removed += _unlink(folder / name)
            return removed

    def _invalid_against_sidecar(
        self, folder: Path, key: CacheKey, mtimes: dict[str, float], older_than: float
    ) -> list[str]:
        """The sidecar and objects a malformed sidecar leaves, or the objects it does not name."""
        sidecar = f"{key.voice}{SIDECAR_SUFFIX}"
        try:
            raw = _read_bounded(folder / sidecar, _MAX_SIDECAR_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return []
        parsed = _parse_sidecar(raw, key) if raw is not None else None
        old_objects = [n for n in mtimes if n != sidecar and mtimes[n] < older_than]
        if parsed is None:
            return [sidecar, *old_objects]
        meta, object_name = parsed
        try:
            intact = (folder / object_name).stat().st_size == meta.length
        except (FileNotFoundError, NotADirectoryError):
            intact = False
        if not intact:
            # Objects are replaced whole, so a wrong length is damage, not a write in progress.
            return [sidecar, *old_objects]
        return [name for name in old_objects if name != object_name]

    def _message_folders(
        self,
    ) -> Iterator[tuple[Path, tuple[str, str, str], dict[str, os.stat_result]]]:
        """Every `{user}/{thread}/{message}` folder with its regular files; links not followed."""
        for user in _subfolders(self.base):
            for thread in _subfolders(user):
                for message in _subfolders(thread):
                    yield message, (user.name, thread.name, message.name), _regular_files(message)


def split_names(
    names: Iterable[str],
) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """One message folder's names: sidecars by voice, objects by voice, and temporary files.

    Names that are none of these, or whose voice is not a valid id, are not ours and are left out.
    """
    sidecars: dict[str, str] = {}
    objects: dict[str, list[str]] = {}
    temporary: list[str] = []
    for name in names:
        if name.startswith(TMP_PREFIX):
            temporary.append(name)
        elif name.endswith(SIDECAR_SUFFIX):
            voice = name[: -len(SIDECAR_SUFFIX)]
            if valid_id(voice):
                sidecars[voice] = name
        else:
            voice, dot, extension = name.rpartition(".")
            if dot and extension in OBJECT_EXTENSIONS and valid_id(voice):
                objects.setdefault(voice, []).append(name)
    return sidecars, objects, sorted(temporary)


def stale_names(mtimes: Mapping[str, float | None], older_than: float) -> list[str]:
    """What a crash left in one message folder, judged by names and times alone.

    Temporary files, objects without a sidecar and sidecars without any object, each only once
    last changed before `older_than` (an unknown time is never old).
    """

    def old(name: str) -> bool:
        changed = mtimes[name]
        return changed is not None and changed < older_than

    sidecars, objects, temporary = split_names(mtimes)
    stale = [name for name in temporary if old(name)]
    for voice, names in objects.items():
        if voice not in sidecars:
            stale.extend(name for name in names if old(name))
    stale.extend(
        sidecar for voice, sidecar in sidecars.items() if voice not in objects and old(sidecar)
    )
    return stale


def _object_names(voice: str) -> list[str]:
    return [f"{voice}.{extension}" for extension in sorted(OBJECT_EXTENSIONS)]


def _subfolders(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as found:
            return [Path(item.path) for item in found if item.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _regular_files(path: Path) -> dict[str, os.stat_result]:
    files: dict[str, os.stat_result] = {}
    try:
        with os.scandir(path) as found:
            for item in found:
                with contextlib.suppress(FileNotFoundError):
                    if item.is_file(follow_symlinks=False):
                        files[item.name] = item.stat(follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return files


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return 0
    return 1


def _prune_empty_folders(base: Path, older_than: float) -> None:
    """Remove empty user, thread and message folders (evictions leave them behind)."""
    for folder, _, _ in os.walk(base, topdown=False):
        if folder == str(base):
            continue
        # A folder just made by a writer is young; one it fills meanwhile refuses rmdir.
        with contextlib.suppress(OSError):
            if os.stat(folder).st_mtime < older_than:
                os.rmdir(folder)


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


def _require_valid(key: CacheKey) -> None:
    # The message names no id: it may reach a log.
    if not key.valid():
        raise ValueError("invalid cache key")


def _key_json(key: CacheKey) -> dict[str, str]:
    return {
        "user": key.user,
        "thread_id": key.thread_id,
        "message_id": key.message_id,
        "voice": key.voice,
    }


def _parse_sidecar(raw: bytes, key: CacheKey) -> tuple[EntryMeta, str] | None:
    """The metadata and object name a sidecar records, or None when it is malformed."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            return None
        meta = EntryMeta.from_json(data)
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    # The object name is rebuilt from the key, never taken from the file, so a tampered
    # sidecar cannot point outside its folder.
    object_name = f"{key.voice}.{extension_for(meta.content_type)}"
    if data.get("object") != object_name or data.get("key") != _key_json(key):
        return None
    return meta, object_name


def _load_sidecar(folder: Path, key: CacheKey) -> tuple[bool, tuple[EntryMeta, str] | None]:
    """(whether a sidecar file is there, its parsed content when it is valid for `key`)."""
    try:
        raw = _read_bounded(folder / f"{key.voice}{SIDECAR_SUFFIX}", _MAX_SIDECAR_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return False, None
    return True, _parse_sidecar(raw, key) if raw is not None else None


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than `limit`."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size > limit:
            return None
        data = handle.read(limit + 1)
    return data if len(data) <= limit else None


def _remove_entry(folder: Path, voice: str) -> None:
    # Sidecar first: from then on a reader sees a miss, whatever objects remain.
    with contextlib.suppress(NotADirectoryError):
        (folder / f"{voice}{SIDECAR_SUFFIX}").unlink(missing_ok=True)
        for extension in OBJECT_EXTENSIONS:
            (folder / f"{voice}.{extension}").unlink(missing_ok=True)


def lower_thread_priority(steps: int = BACKGROUND_NICE) -> None:
    """Raise the calling thread's nice value by `steps` (Linux, where each thread has its own)."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))


def _make_folder(folder: str) -> bool:
    """Create a message folder (and its parents when missing); True when it was new."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        return False
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return True


def _write_synced(folder: str, data: bytes) -> str:
    """`data` in a new temporary file in `folder`, synced to disk; returns the file's path."""
    path = os.path.join(folder, f"{TMP_PREFIX}{secrets.token_hex(8)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _discard(path)
        raise
    os.close(fd)
    return path


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_other_objects(folder: str, voice: str, keep: str) -> None:
    """Objects of `voice` in another format than `keep` (the entry's content type changed)."""
    stem = f"{voice}."
    for name in os.listdir(folder):
        if name != keep and name.startswith(stem) and name[len(stem) :] in OBJECT_EXTENSIONS:
            _discard(os.path.join(folder, name))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        # Some filesystems refuse fsync on a directory; the rename itself has happened.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
