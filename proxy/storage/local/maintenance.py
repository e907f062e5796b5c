"""The local Volume's walks: listing entries, removing subtrees, and clearing crash leftovers.

Each function here blocks: the Volume runs it in one of its low-priority threads. Walks never
follow links: a link in the tree is not descended into, so nothing outside the root is listed or
removed by a walk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from proxy.speak import CacheKey
from proxy.storage.entry import EntryInfo
from proxy.storage.layout import (
    SIDECAR_SUFFIX,
    TMP_PREFIX,
    object_names,
    sidecar_name,
    split_names,
    stale_names,
)
from proxy.storage.local.io import KeyLocks, load_sidecar, resolve_under, unlink_counted

# Passes of a prefix's removal while writers add files under it (see delete_prefix).
RMTREE_PASSES = 3


def scan(
    base: Path,
    user: str | None = None,
    thread_id: str | None = None,
    message_id: str | None = None,
) -> list[EntryInfo]:
    """Every entry with an object under `base`, or under a (checked) user, thread or message.

    Size = its objects' sizes, created = the newest object's mtime, last hit = the sidecar's
    mtime (never before created).
    """
    found: list[EntryInfo] = []
    for _, ids, files in message_folders(base, user, thread_id, message_id):
        sidecars, objects, _ = split_names(files)
        for voice, sidecar in sidecars.items():
            names = objects.get(voice)
            key = CacheKey(*ids, voice)
            if not names or not key.valid():
                continue
            created = max(files[name].st_mtime for name in names)
            found.append(
                EntryInfo(
                    key,
                    sum(files[name].st_size for name in names),
                    created_at=created,
                    last_hit_at=max(created, files[sidecar].st_mtime),
                )
            )
    return found


def delete_prefix(root: Path, base: Path, parts: list[str]) -> int:
    """Remove the folder of the (checked) ids in `parts`; return how many entries it held."""
    target = resolve_under(root, base.joinpath(*parts))
    if not target.is_dir():
        return 0
    removed = sum(
        1
        for _, _, files in os.walk(target)
        for name in files
        if name.endswith(SIDECAR_SUFFIX) and not name.startswith(TMP_PREFIX)
    )
    # Another worker may be writing under the folder (its fill committed just before the
    # purge): a file it adds makes a pass fail with ENOTEMPTY, and the next pass takes it. What a
    # write adds after the last pass is that worker's to remove when the purge reaches it
    # (fleet/local.py removes the keys whose write it waited for).
    for _ in range(RMTREE_PASSES):
        try:
            shutil.rmtree(target)
            break
        except FileNotFoundError:
            break
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    return removed


def clean_leftovers(base: Path) -> int:
    """Remove every temporary file under `base`, whatever its age; return how many."""
    removed = 0
    for folder, _, files in os.walk(base):
        for name in files:
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def record_hits(root: Path, base: Path, hits: Mapping[CacheKey, float]) -> int:
    """Move sidecars' mtimes forward to the hit times given; return how many moved."""
    recorded = 0
    for key, at in hits.items():
        if not key.valid():
            continue
        try:
            folder = resolve_under(root, base / key.user / key.thread_id / key.message_id)
            sidecar = folder / sidecar_name(key.voice)
            if sidecar.stat().st_mtime < at:
                os.utime(sidecar, (at, at))
                recorded += 1
        except (OSError, ValueError):
            # Gone meanwhile, read-only, or a link out of the root: a hit is not worth more.
            continue
    return recorded


class OrphanWalk:
    """The walk for crash leftovers, bounded per call and resumed where the last call stopped.

    Each call looks at most `limit` folders, so a run costs the same on a Volume of any size; a
    full pass over a Volume of F message folders takes about F / limit calls. Leftovers are
    temporary files, objects without a valid sidecar and sidecars without their object; empty
    folders are pruned too (not counted). Anything changed since `older_than` is left alone: it
    may be a write in progress in another process. Called from one thread at a time.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self._pending: Iterator[tuple[Path, tuple[str, str, str] | None]] | None = None

    def clean(self, locks: KeyLocks, limit: int, older_than: float) -> int:
        """Remove up to `limit` leftovers from the next `limit` folders; return how many."""
        removed = looked = 0
        if self._pending is None:
            self._pending = _folders_below(self.base)
        for folder, ids in self._pending:
            looked += 1
            if ids is None:
                _prune_if_empty(folder, older_than)
            else:
                removed += _clean_message_folder(folder, ids, locks, limit - removed, older_than)
            if looked >= limit or removed >= limit:
                return removed
        self._pending = None  # a whole pass ended: the next call starts another
        return removed


def _clean_message_folder(
    folder: Path, ids: tuple[str, str, str], locks: KeyLocks, limit: int, older_than: float
) -> int:
    files = _regular_files(folder)
    if not files:
        _prune_if_empty(folder, older_than)
        return 0
    removed = 0
    mtimes = {name: status.st_mtime for name, status in files.items()}
    sidecars, objects, temporary = split_names(mtimes)
    for name in temporary:
        if removed < limit and mtimes[name] < older_than:
            removed += unlink_counted(folder / name)
    for voice in sorted(sidecars.keys() | objects.keys()):
        if removed >= limit:
            break
        names = [*objects.get(voice, ()), sidecars.get(voice, "")]
        key = CacheKey(*ids, voice)
        if key.valid() and any(mtimes.get(name, older_than) < older_than for name in names):
            removed += _clean_voice(folder, key, locks, older_than, limit - removed)
    return removed


def _folders_below(base: Path) -> Iterator[tuple[Path, tuple[str, str, str] | None]]:
    """Message folders under `base` with their ids, then each thread and user folder (ids None)
    after the folders inside it; links not followed, subfolders listed as the walk reaches them."""
    for user_folder in _subfolders(base):
        for thread in _subfolders(user_folder):
            for message in _subfolders(thread):
                yield message, (user_folder.name, thread.name, message.name)
            yield thread, None
        yield user_folder, None


def _prune_if_empty(folder: Path, older_than: float) -> None:
    # A folder just made by a writer is young; one it fills meanwhile refuses rmdir.
    with contextlib.suppress(OSError):
        if folder.stat().st_mtime < older_than:
            os.rmdir(folder)


def message_folders(
    base: Path,
    user: str | None = None,
    thread_id: str | None = None,
    message_id: str | None = None,
) -> Iterator[tuple[Path, tuple[str, str, str], dict[str, os.stat_result]]]:
    """Every `{user}/{thread}/{message}` folder with its regular files; links not followed.

    A (checked) user, thread or message narrows the walk to the folders under those ids.
    """
    for user_folder in _subfolders(base, user):
        for thread in _subfolders(user_folder, thread_id):
            for message in _subfolders(thread, message_id):
                ids = (user_folder.name, thread.name, message.name)
                yield message, ids, _regular_files(message)


def _clean_voice(
    folder: Path, key: CacheKey, locks: KeyLocks, older_than: float, limit: int
) -> int:
    """Remove one voice's leftovers, judged again under its lock from fresh stats."""
    sidecar = sidecar_name(key.voice)
    with locks.of(key):
        mtimes: dict[str, float] = {}
        for name in (sidecar, *object_names(key.voice)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                mtimes[name] = (folder / name).stat().st_mtime
        doomed = set(stale_names(mtimes, older_than))
        if sidecar in mtimes and sidecar not in doomed and mtimes[sidecar] < older_than:
            doomed.update(_invalid_against_sidecar(folder, key, mtimes, older_than))
        removed = 0
        # Sidecar first: from then on a reader sees a miss, whatever objects remain.
        for name in sorted(doomed, key=lambda name: not name.endswith(SIDECAR_SUFFIX)):
            if removed < limit:
                removed += unlink_counted(folder / name)
        return removed


def _invalid_against_sidecar(
    folder: Path, key: CacheKey, mtimes: dict[str, float], older_than: float
) -> list[str]:
    """The sidecar and objects a malformed sidecar leaves, or the objects it does not name."""
    sidecar = sidecar_name(key.voice)
    present, parsed = load_sidecar(folder, key)
    if not present:
        return []
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


def _subfolders(path: Path, only: str | None = None) -> list[Path]:
    """The folders in `path` (or just the one named `only`), links excluded."""
    if only is not None:
        named = path / only
        try:
            return [named] if stat.S_ISDIR(named.lstat().st_mode) else []
        except (FileNotFoundError, NotADirectoryError):
            return []
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
