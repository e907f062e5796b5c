"""One key's files on a Databricks Volume: written, its sidecar read, checked, listed, removed."""

from __future__ import annotations

import logging

from proxy.speak import CacheKey
from proxy.storage.databricks.files_api import FILES_API, Call, FilesApi, Reply, check
from proxy.storage.databricks.paths import VolumePaths
from proxy.storage.entry import Entry, EntryMeta
from proxy.storage.layout import MAX_SIDECAR_BYTES, encode_sidecar, is_object_of, parse_sidecar

Sidecar = tuple[bool, tuple[EntryMeta, str] | None]

logger = logging.getLogger(__name__)


class EntryFiles:
    """The Files API calls on one key's sidecar and objects, inside a guarded operation."""

    def __init__(self, api: FilesApi, paths: VolumePaths) -> None:
        self._api = api
        self._paths = paths

    def object_path(self, key: CacheKey, name: str) -> str:
        """The path of `key`'s object called `name`."""
        return f"{self._paths.folder(key)}/{name}"

    async def sidecar(self, call: Call, key: CacheKey) -> Sidecar:
        """(whether a sidecar is there, its metadata and object name when it is valid)."""
        reply = await self._fetch_sidecar(call, key)
        if reply.status == 404:
            return False, None
        check(reply, "GET")
        return True, parse_sidecar(reply.body, key) if reply.body is not None else None

    async def remove_if_unchanged(
        self, call: Call, key: CacheKey, meta: EntryMeta | None, name: str | None
    ) -> None:
        """Remove the entry unless another writer replaced its sidecar since it was read.

        `meta` is what the reader found (None: a malformed sidecar), `name` its object (None:
        every object of the key).
        """
        reply = await self._fetch_sidecar(call, key)
        if 200 <= reply.status < 300 and reply.body is not None:
            current = parse_sidecar(reply.body, key)
            if current is not None and current[0] != meta:
                logger.debug("volume entry %s was replaced meanwhile: kept", call.digest)
                return
        await self.remove(call, key, name)

    async def remove(self, call: Call, key: CacheKey, name: str | None) -> None:
        """Remove the sidecar, then the object `name` (every object of the key when None)."""
        # Sidecar first: from then on a reader sees a miss, whatever objects remain.
        await self._api.delete_file(call, self._paths.sidecar(key))
        for other in [name] if name is not None else await self.objects_of(call, key):
            await self._api.delete_file(call, self.object_path(key, other))

    async def write(self, call: Call, key: CacheKey, entry: Entry) -> None:
        """The object, then the sidecar that names it (a reader trusts only the sidecar)."""
        name, sidecar = encode_sidecar(key, entry.meta)
        await self._api.upload(call, self.object_path(key, name), entry.body)
        await self._api.upload(call, self._paths.sidecar(key), sidecar)
        # Two calls, no listing: an earlier recording in another format (rare: the provider's
        # format changed) lingers unread beside the sidecar, which names the new object, until
        # the orphan walk removes it (VolumeWalks). Listing here cost a third of every write.

    async def exists(self, call: Call, key: CacheKey) -> bool:
        """True when the sidecar is valid and its object has the length it records."""
        _, parsed = await self.sidecar(call, key)
        if parsed is None:
            return False
        meta, name = parsed
        head = await self._api.exchange(call, "HEAD", FILES_API, self.object_path(key, name))
        if head.status == 404:
            return False
        check(head, "HEAD")
        length = head.headers.get("Content-Length")
        return length is None or length == str(meta.length)

    async def objects_of(self, call: Call, key: CacheKey) -> list[str]:
        """The names of `key`'s objects in its folder, whatever their format."""
        listing = await self._api.listing(call, self._paths.folder(key))
        names = listing.files if listing is not None else {}
        return [name for name in names if is_object_of(name, key.voice)]

    async def _fetch_sidecar(self, call: Call, key: CacheKey) -> Reply:
        path = self._paths.sidecar(key)
        return await self._api.exchange(call, "GET", FILES_API, path, limit=MAX_SIDECAR_BYTES)
