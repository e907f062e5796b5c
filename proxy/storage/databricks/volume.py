"""DatabricksVolume: the durable tier on a Unity Catalog Volume, through the Files API."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp

from proxy.config import VolumeSettings
from proxy.speak import CacheKey
from proxy.storage.breaker import BreakerState, CircuitBreaker
from proxy.storage.databricks.auth import Credentials
from proxy.storage.databricks.files_api import (
    DIRECTORIES_API,
    FILES_API,
    READ_CHUNK_BYTES,
    Call,
    FilesApi,
    Reply,
    VolumeRequestFailed,
    VolumeUnavailable,
    check,
)
from proxy.storage.databricks.maintenance import VolumeWalks
from proxy.storage.databricks.paths import VolumePaths
from proxy.storage.databricks.streamed import StreamedEntry
from proxy.storage.entry import Entry, EntryInfo, EntryMeta
from proxy.storage.layout import (
    MAX_SIDECAR_BYTES,
    encode_sidecar,
    is_object_of,
    object_name,
    parse_sidecar,
    require_valid,
)

if TYPE_CHECKING:
    from databricks.sdk.config import Config

_LOCK_STRIPES = 64
_Sidecar = tuple[bool, tuple[EntryMeta, str] | None]

T = TypeVar("T")
logger = logging.getLogger(__name__)


class DatabricksVolume:
    """The durable tier on a Unity Catalog Volume, through the Files API over aiohttp.

    Layout and integrity rules are every Volume's (`proxy.storage.layout`). Every operation runs
    behind a circuit breaker with a deadline of its own. Credentials come from databricks-sdk's
    unified auth (`auth = "app"`) or from the on-behalf-of token of the request being served
    (`auth = "user"`, `CURRENT_TOKEN`); without that token an operation is skipped.
    """

    name = "volume"
    kind = "databricks"

    def __init__(
        self,
        settings: VolumeSettings,
        *,
        host: str | None = None,
        config: Config | None = None,
        config_options: Mapping[str, Any] | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        chunk_size: int = READ_CHUNK_BYTES,
    ) -> None:
        self.paths = VolumePaths.of(settings.path, settings.prefix)
        self.auth: Literal["app", "user"] = settings.auth
        self.timeout_seconds = settings.timeout_seconds
        self.breaker = CircuitBreaker(
            max(1, settings.failure_threshold), max(0.0, settings.cooldown_seconds), clock=clock
        )
        self.chunk_size = chunk_size
        self._credentials = Credentials(
            settings.auth, host=host, config=config, config_options=config_options
        )
        self._api = FilesApi(
            retries=settings.retries,
            session=session,
            jitter=jitter,
            on_unauthorized=self._credentials.forget,
        )
        # Writes and checks of one key (put, delete, exists, orphan removal) take its stripe in
        # this process, so a check never judges a half-written entry and removes a good one.
        self._stripes = tuple(asyncio.Lock() for _ in range(_LOCK_STRIPES))
        self._walks = VolumeWalks(self.paths, self._api, self._guarded, self._stripe)

    @property
    def breaker_state(self) -> BreakerState:
        """closed, open or half-open."""
        return self.breaker.state

    @property
    def walkable(self) -> bool:
        """False with `auth = "user"`: outside a request there is no token to list with."""
        return self.auth != "user"

    def describe(self) -> str:
        """The kind and the breaker's state, as the dashboard shows them."""
        return f"Databricks, breaker {self.breaker.state}"

    # The Tier protocol

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry under `key`, or None; a torn, corrupt or malformed entry is removed."""
        require_valid(key)
        if self._skipped(key):
            return None
        # Reads take no lock: a hot key is read by every client at once. A read racing a write
        # may see the old sidecar beside the new object; the removal then re-reads the sidecar
        # first, so at worst one entry is lost (a later miss), and no client is ever served
        # bytes that fail their digest.
        return await self._guarded(key.digest(), lambda call: self._get(call, key))

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`: object first, sidecar last, both overwritten in place."""
        require_valid(key)
        if not entry.intact():
            raise ValueError("entry body disagrees with its metadata")
        if self._skipped(key):
            return
        async with self._stripe(key):
            await self._guarded(key.digest(), lambda call: self._put(call, key, entry))

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        require_valid(key)
        if self._skipped(key):
            return
        async with self._stripe(key):
            await self._guarded(key.digest(), lambda call: self._remove_entry(call, key, None))

    async def aclose(self) -> None:
        """Close the HTTP session this tier opened."""
        await self._api.aclose()

    # The DurableTier protocol

    def get_nowait(self, key: CacheKey) -> Entry | None:
        """Always None: a Databricks read always awaits the network (ask `open`)."""
        return None

    async def open(self, key: CacheKey) -> StreamedEntry | None:
        """A streamed hit whose first bytes do not wait for the whole object, or None."""
        require_valid(key)
        if self._skipped(key):
            return None
        return await self._guarded(key.digest(), lambda call: self._open(call, key))

    async def read_meta(self, key: CacheKey) -> EntryMeta | None:
        """The sidecar's metadata; None when absent, malformed (kept) or without a token."""
        require_valid(key)
        if self._skipped(key):
            return None
        _, parsed = await self._guarded(key.digest(), lambda call: self._sidecar(call, key))
        return parsed[0] if parsed is not None else None

    async def exists(self, key: CacheKey) -> bool:
        """True when `key` has a valid sidecar and its object has the length the sidecar records."""
        require_valid(key)
        if self._skipped(key):
            # Unknown is not "absent": a False here would drop the entry's index row.
            raise VolumeUnavailable("no credentials to check the Volume with")
        async with self._stripe(key):
            return await self._guarded(key.digest(), lambda call: self._exists(call, key))

    def location(self, key: CacheKey, content_type: str) -> str:
        """The Volume path of the object for `key` (what the index and legacy metadata record)."""
        require_valid(key)
        return f"{self.paths.folder(key)}/{object_name(key, content_type)}"

    async def list_entries(
        self,
        user: str | None = None,
        thread_id: str | None = None,
        message_id: str | None = None,
    ) -> AsyncIterator[EntryInfo]:
        """Every entry (one per sidecar) under the base, a user, a thread or a message."""
        target = self.paths.under(user, thread_id, message_id)
        if self._skipped(None):
            return
        async for entry in self._walks.entries(target, need_object=False):
            yield entry

    async def scan(self) -> list[EntryInfo]:
        """Every entry with an object; one listing per folder (with many, budget from an index)."""
        if self._skipped(None):
            raise VolumeUnavailable("no credentials to walk the Volume with")
        return await self._walks.scan()

    async def delete_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Remove a user's, a thread's or a message's entries; return how many entries went."""
        target = self.paths.target(user, thread_id, message_id)
        if self._skipped(None):
            return 0
        return await self._walks.delete_prefix(target)

    async def record_hits(self, hits: Mapping[CacheKey, float]) -> bool:
        """False: the Files API keeps no access times, so the caller keeps the hits itself."""
        return False

    async def clean_leftovers(self) -> int:
        """Always 0: uploads leave no temporary files on a Databricks Volume."""
        return 0

    async def clean_orphans(self, *, limit: int, older_than: float) -> int:
        """Remove up to `limit` leftovers older than `older_than`, the walk resuming each call."""
        if self._skipped(None):
            raise VolumeUnavailable("no credentials to walk the Volume with")
        return await self._walks.clean_orphans(limit=limit, older_than=older_than)

    async def ping(self) -> bool:
        """True when the Volume root answers; False when it does not or the breaker is open."""
        if self._skipped(None):
            # Nobody's token to ask with: report only what the breaker knows.
            return self.breaker.state != "open"
        try:
            reply = await self._guarded(
                "-", lambda call: self._api.exchange(call, "HEAD", DIRECTORIES_API, self.paths.root)
            )
        except (VolumeUnavailable, VolumeRequestFailed):
            return False
        return 200 <= reply.status < 300

    # Operations, run under _guarded

    async def _get(self, call: Call, key: CacheKey) -> Entry | None:
        parsed = await self._sidecar_or_remove(call, key)
        if parsed is None:
            return None
        meta, name = parsed
        path = f"{self.paths.folder(key)}/{name}"
        reply = await self._api.exchange(call, "GET", FILES_API, path, limit=meta.length)
        body: bytes | None = None
        if reply.status != 404:
            check(reply, "GET")
            body = reply.body
        entry = Entry(meta, body) if body is not None else None
        if entry is None or not entry.intact():
            logger.debug("volume entry %s is torn or corrupt: removed", call.digest)
            await self._remove_if_unchanged(call, key, meta, name)
            return None
        logger.debug("volume hit %s", call.digest)
        return entry

    async def _open(self, call: Call, key: CacheKey) -> StreamedEntry | None:
        parsed = await self._sidecar_or_remove(call, key)
        if parsed is None:
            return None
        meta, name = parsed
        path = f"{self.paths.folder(key)}/{name}"
        reply = await self._api.exchange(
            call, "GET", FILES_API, path, limit=meta.length, stream=True
        )
        response = reply.response
        if response is None:
            if reply.status != 404:
                check(reply, "GET")
                return None
            await self._remove_if_unchanged(call, key, meta, name)
            return None
        if response.content_length is not None and response.content_length != meta.length:
            response.close()
            logger.debug("volume entry %s has the wrong length: removed", call.digest)
            await self._remove_if_unchanged(call, key, meta, name)
            return None

        async def discard() -> None:
            try:
                await self._guarded(
                    call.digest, lambda again: self._remove_if_unchanged(again, key, meta, name)
                )
            except Exception as exc:
                logger.debug("volume removal of %s failed: %s", call.digest, type(exc).__name__)

        logger.debug("volume streamed hit %s", call.digest)
        return StreamedEntry(
            meta,
            response,
            chunk_size=self.chunk_size,
            read_timeout=self.timeout_seconds,
            on_corrupt=discard,
            on_broken=self.breaker.record_failure,
        )

    async def _put(self, call: Call, key: CacheKey, entry: Entry) -> None:
        name, sidecar = encode_sidecar(key, entry.meta)
        await self._api.upload(call, f"{self.paths.folder(key)}/{name}", entry.body)
        await self._api.upload(call, self.paths.sidecar(key), sidecar)
        # An earlier recording in another format would linger beside the new one.
        try:
            for other in await self._objects_of(call, key):
                if other != name:
                    await self._api.delete_file(call, f"{self.paths.folder(key)}/{other}")
        except (VolumeUnavailable, VolumeRequestFailed) as exc:
            logger.debug("volume cleanup after put %s skipped: %s", call.digest, type(exc).__name__)

    async def _exists(self, call: Call, key: CacheKey) -> bool:
        _, parsed = await self._sidecar(call, key)
        if parsed is None:
            return False
        meta, name = parsed
        path = f"{self.paths.folder(key)}/{name}"
        head = await self._api.exchange(call, "HEAD", FILES_API, path)
        if head.status == 404:
            return False
        check(head, "HEAD")
        length = head.headers.get("Content-Length")
        return length is None or length == str(meta.length)

    async def _sidecar(self, call: Call, key: CacheKey) -> _Sidecar:
        """(whether a sidecar is there, its metadata and object name when it is valid)."""
        reply = await self._fetch_sidecar(call, key)
        if reply.status == 404:
            return False, None
        check(reply, "GET")
        return True, parse_sidecar(reply.body, key) if reply.body is not None else None

    async def _sidecar_or_remove(self, call: Call, key: CacheKey) -> tuple[EntryMeta, str] | None:
        """The sidecar's metadata and object name; None on a miss (a malformed one is removed)."""
        found, parsed = await self._sidecar(call, key)
        if not found:
            logger.debug("volume miss %s", call.digest)
        elif parsed is None:
            logger.debug("volume sidecar of %s is malformed: removed", call.digest)
            await self._remove_entry(call, key, None)
        return parsed

    async def _fetch_sidecar(self, call: Call, key: CacheKey) -> Reply:
        path = self.paths.sidecar(key)
        return await self._api.exchange(call, "GET", FILES_API, path, limit=MAX_SIDECAR_BYTES)

    async def _remove_if_unchanged(
        self, call: Call, key: CacheKey, meta: EntryMeta, name: str
    ) -> None:
        """Remove the entry unless another writer replaced its sidecar since it was read."""
        reply = await self._fetch_sidecar(call, key)
        if 200 <= reply.status < 300 and reply.body is not None:
            current = parse_sidecar(reply.body, key)
            if current is not None and current[0] != meta:
                logger.debug("volume entry %s was replaced meanwhile: kept", call.digest)
                return
        await self._remove_entry(call, key, name)

    async def _remove_entry(self, call: Call, key: CacheKey, name: str | None) -> None:
        # Sidecar first: from then on a reader sees a miss, whatever objects remain.
        await self._api.delete_file(call, self.paths.sidecar(key))
        for other in [name] if name is not None else await self._objects_of(call, key):
            await self._api.delete_file(call, f"{self.paths.folder(key)}/{other}")

    async def _objects_of(self, call: Call, key: CacheKey) -> list[str]:
        """The names of `key`'s objects in its folder, whatever their format."""
        listing = await self._api.listing(call, self.paths.folder(key))
        names = listing.files if listing is not None else {}
        return [name for name in names if is_object_of(name, key.voice)]

    # Plumbing

    async def _guarded(self, digest: str, operation: Callable[[Call], Awaitable[T]]) -> T:
        """Run `operation` behind the breaker, with credentials and a deadline of its own."""
        if not self.breaker.allow():
            raise VolumeUnavailable("the Volume circuit breaker is open")
        try:
            deadline = asyncio.get_running_loop().time() + self.timeout_seconds
            host, headers = await self._credentials.for_call(deadline)
            result = await operation(Call(host, headers, deadline, digest))
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except VolumeRequestFailed as exc:
            if self.auth == "user" and exc.status in (401, 403):
                # One user's token says nothing about the Volume's health.
                self.breaker.release()
            else:
                self.breaker.record_failure()
            raise
        except Exception:
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    def _skipped(self, key: CacheKey | None) -> bool:
        if self._credentials.usable():
            return False
        logger.debug("volume skipped for %s: no on-behalf-of token", key.digest() if key else "-")
        return True

    def _stripe(self, key: CacheKey) -> asyncio.Lock:
        return self._stripes[hash(key) % _LOCK_STRIPES]
