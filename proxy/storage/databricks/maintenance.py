"""The Databricks Volume's walks: its entries, a prefix's removal, the resumable orphan walk."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

from proxy.speak import CacheKey
from proxy.storage.databricks.entry_files import EntryFiles
from proxy.storage.databricks.files_api import Call, FilesApi, FolderListing, ListedFile
from proxy.storage.databricks.paths import VolumePaths
from proxy.storage.entry import EntryInfo
from proxy.storage.layout import (
    SIDECAR_SUFFIX,
    changed_before,
    is_object_of,
    sidecar_name,
    split_names,
    stale_names,
    voice_of,
)

T = TypeVar("T")


class Guard(Protocol):
    """Runs one operation behind the Volume's breaker, with credentials and a deadline."""

    def __call__(self, digest: str, operation: Callable[[Call], Awaitable[T]]) -> Awaitable[T]:
        """The operation's result; it raises what the operation raised."""
        ...


def entries_in(
    ids: tuple[str, str, str], files: Mapping[str, ListedFile], *, need_object: bool
) -> list[EntryInfo]:
    """One message folder's entries: one per sidecar, or per sidecar beside an object.

    Bytes are the objects' sizes. The Files API keeps no access times, so created and last hit
    are both the sidecar's last write (the newest object's when the listing gives none).
    """
    sidecars, objects, _ = split_names(files)
    found: list[EntryInfo] = []
    for voice, sidecar in sidecars.items():
        names = objects.get(voice, [])
        key = CacheKey(*ids, voice)
        if (need_object and not names) or not key.valid():
            continue
        newest_object = max((files[name].modified or 0.0 for name in names), default=0.0)
        written = files[sidecar].modified or newest_object
        size = sum(files[name].size or 0 for name in names)
        found.append(EntryInfo(key, size, created_at=written, last_hit_at=written))
    return found


class VolumeWalks:
    """Walks over the Volume's folders, each folder listed (every page) in one guarded call."""

    def __init__(
        self,
        paths: VolumePaths,
        api: FilesApi,
        guard: Guard,
        stripe: Callable[[CacheKey], asyncio.Lock],
    ) -> None:
        self._paths = paths
        self._api = api
        self._files = EntryFiles(api, paths)
        self._guard = guard
        self._stripe = stripe
        # Folders the orphan walk has still to list; it resumes here on the next call.
        self._orphan_walk: list[str] = []

    async def walk(
        self, pending: list[str], *, max_folders: int | None = None
    ) -> AsyncGenerator[tuple[str, FolderListing], None]:
        """Every folder in `pending` and under it, depth first, with its listing.

        `pending` is the walk's state, so a walk stopped anywhere resumes from it: a folder
        leaves it only once listed (a failed listing puts it back), and its subfolders join it
        before it is yielded. A folder that does not exist is skipped; at most `max_folders`
        folders are listed.
        """
        listed = 0
        while pending and (max_folders is None or listed < max_folders):
            folder = pending.pop()
            listed += 1
            try:
                list_folder = functools.partial(self._api.listing, folder=folder)
                listing = await self._guard("-", list_folder)
            except BaseException:
                pending.append(folder)
                raise
            if listing is None:
                continue
            pending.extend(listing.folders)
            yield folder, listing

    async def entries(self, target: str, *, need_object: bool) -> AsyncIterator[EntryInfo]:
        """Every entry in the message folders under `target` (see `entries_in`)."""
        async for folder, listing in self.walk([target]):
            ids = self._paths.ids_of(folder)
            if ids is not None:
                for entry in entries_in(ids, listing.files, need_object=need_object):
                    yield entry

    async def scan(self) -> list[EntryInfo]:
        """Every entry with an object, walking every folder (one listing per folder)."""
        return [entry async for entry in self.entries(self._paths.base, need_object=True)]

    async def delete_prefix(self, target: str) -> int:
        """Remove every file and folder under `target`, target included; return how many entries."""
        files: list[str] = []
        folders: list[str] = []
        async for folder, listing in self.walk([target]):
            folders.append(folder)
            files.extend(f"{folder}/{name}" for name in listing.files)
        sidecars = [path for path in files if path.endswith(SIDECAR_SUFFIX)]
        # Sidecars first: from then on readers miss, whatever objects remain.
        for path in sidecars + [path for path in files if not path.endswith(SIDECAR_SUFFIX)]:
            await self._guard("-", functools.partial(self._api.delete_file, path=path))
        for path in sorted(folders, key=lambda folder: folder.count("/"), reverse=True):
            await self._guard("-", functools.partial(self._api.delete_directory, path=path))
        return len(sidecars)

    async def clean_orphans(self, *, limit: int, older_than: float) -> int:
        """Remove up to `limit` crash leftovers last written before `older_than`; return how many.

        Leftovers are objects without a sidecar and sidecars without an object (judged by name:
        reading every sidecar would cost a call per entry; `get` removes malformed ones). Each
        call lists at most `limit` folders and the walk resumes there on the next call. Empty
        folders are removed too (not counted).
        """
        base = self._paths.base
        if not self._orphan_walk:
            self._orphan_walk.append(base)
        removed = 0
        walk = self.walk(self._orphan_walk, max_folders=limit)
        async with contextlib.aclosing(walk) as folders:
            async for folder, listing in folders:
                if not listing.files and not listing.folders and folder != base:
                    delete = functools.partial(self._api.delete_directory, path=folder)
                    await self._guard("-", delete)
                elif (ids := self._paths.ids_of(folder)) is not None:
                    budget = limit - removed
                    removed += await self._clean_folder(folder, ids, listing, older_than, budget)
                if removed >= limit:
                    break
        return removed

    async def _clean_folder(
        self,
        folder: str,
        ids: tuple[str, str, str],
        listing: FolderListing,
        older_than: float,
        limit: int,
    ) -> int:
        """Remove one message folder's leftovers, each voice judged again under its lock."""
        mtimes = {name: file.modified for name, file in listing.files.items()}
        stale = stale_names(mtimes, older_than)
        _, _, temporary = split_names(stale)
        removed = 0
        for name in temporary[:limit]:
            delete = functools.partial(self._api.delete_file, path=f"{folder}/{name}")
            await self._guard("-", delete)
            removed += 1
        voices = {voice_of(name) for name in stale if name not in temporary}
        # A voice with objects in two formats: the one its sidecar does not name is superseded
        # (a put writes no listing to find it), judged under the lock with one sidecar read.
        _, objects, _ = split_names(mtimes)
        voices.update(
            voice
            for voice, names in objects.items()
            if len(names) > 1 and any(changed_before(mtimes[name], older_than) for name in names)
        )
        for voice in sorted(voices):
            key = CacheKey(*ids, voice)
            if removed >= limit or not key.valid():
                continue
            async with self._stripe(key):
                clean = functools.partial(
                    self._clean_voice, key=key, older_than=older_than, limit=limit - removed
                )
                removed += await self._guard(key.digest(), clean)
        return removed

    async def _clean_voice(self, call: Call, key: CacheKey, older_than: float, limit: int) -> int:
        # A put may have completed the entry since the folder was listed.
        folder = self._paths.folder(key)
        listing = await self._api.listing(call, folder)
        if listing is None:
            return 0
        mine = {
            name: file.modified
            for name, file in listing.files.items()
            if name == sidecar_name(key.voice) or is_object_of(name, key.voice)
        }
        doomed = stale_names(mine, older_than)
        objects = [name for name in mine if is_object_of(name, key.voice)]
        if len(objects) > 1 and sidecar_name(key.voice) in mine:
            _, parsed = await self._files.sidecar(call, key)
            if parsed is not None:  # a malformed sidecar is a lookup's to remove
                _, named = parsed
                doomed += [
                    name
                    for name in objects
                    if name != named
                    and name not in doomed
                    and changed_before(mine[name], older_than)
                ]
        doomed = doomed[:limit]
        # Sidecar first: from then on a reader sees a miss, whatever objects remain.
        for name in sorted(doomed, key=lambda name: not name.endswith(SIDECAR_SUFFIX)):
            await self._api.delete_file(call, f"{folder}/{name}")
        return len(doomed)
