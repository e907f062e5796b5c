"""DatabricksVolume: entries in a Unity Catalog Volume through the Databricks Files API."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy

from proxy.config import VolumeSettings

if TYPE_CHECKING:
    # Imported when used: the SDK costs ~45 MiB and most of a second, and a local Volume
    # never needs it.
    from databricks.sdk.config import Config
from proxy.identity import CURRENT_TOKEN
from proxy.speak import CacheKey, valid_id
from proxy.storage.breaker import BreakerState, CircuitBreaker
from proxy.storage.entry import Entry, EntryMeta
from proxy.storage.entry import EntryInfo as StoredEntryInfo
from proxy.storage.layout import MAX_SIDECAR_BYTES as _MAX_SIDECAR_BYTES
from proxy.storage.layout import (
    OBJECT_EXTENSIONS,
    SIDECAR_SUFFIX,
    extension_for,
    split_names,
    stale_names,
)
from proxy.storage.layout import key_json as _key_json
from proxy.storage.layout import parse_sidecar as _parse_sidecar
from proxy.storage.layout import require_valid as _require_valid

FILES_API: Final = "/api/2.0/fs/files"
DIRECTORIES_API: Final = "/api/2.0/fs/directories"
RETRYABLE_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
# The SDK refreshes its tokens itself; reusing its headers briefly saves a thread hop per call.
_AUTH_CACHE_SECONDS: Final = 30.0
_BACKOFF_BASE_SECONDS: Final = 0.1
_BACKOFF_CAP_SECONDS: Final = 2.0
_ERROR_BODY_LIMIT: Final = 65_536
_LISTING_LIMIT: Final = 16 * 1_048_576
_CHUNK_SIZE: Final = 64 * 1024
_LOCK_STRIPES: Final = 64
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Config options and environment variables whose values must never reach a log line.
_SECRET_OPTIONS: Final = ("token", "client_secret", "password", "azure_client_secret")
_SECRET_ENV: Final = ("DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_PASSWORD")

T = TypeVar("T")
logger = logging.getLogger(__name__)


class VolumeUnavailable(Exception):
    """The Volume cannot be used now: the breaker is open, time ran out, or retries ran out."""


class VolumeRequestFailed(Exception):
    """The Files API refused a call with a status that retrying will not change."""

    def __init__(self, method: str, status: int, error_code: str = "") -> None:
        # Status and error code only: the API's message and the URL may carry the raw ids.
        super().__init__(f"Files API {method} answered {status} {error_code}".rstrip())
        self.status = status
        self.error_code = error_code


class CorruptEntry(Exception):
    """A streamed object disagreed with its sidecar; the entry has been removed."""


@dataclass(frozen=True, slots=True)
class ListedEntry:
    """An entry found by walking the Volume: its key and when its sidecar was last written."""

    key: CacheKey
    last_modified: float | None


@dataclass(frozen=True, slots=True)
class _ListedFile:
    """A file in one folder's listing: its size and modification time, when the API says."""

    size: int | None
    modified: float | None


# One folder's files by name, and its subfolders' paths.
_Listing = tuple[dict[str, _ListedFile], list[str]]


@dataclass(frozen=True, slots=True)
class _Call:
    """One guarded operation: where, with which credentials, until when; the key hash for logs."""

    host: str
    headers: Mapping[str, str]
    deadline: float
    digest: str


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: CIMultiDictProxy[str]
    # None when the body was larger than the limit the caller allowed.
    body: bytes | None
    # A live response whose body the caller streams (and must release).
    response: aiohttp.ClientResponse | None = None


class StreamedEntry:
    """A Volume hit whose body streams as it arrives, checked against its sidecar on the way.

    Every chunk but the last is yielded as soon as it is read; the last one is held until the
    length and sha256 match, and `CorruptEntry` is raised instead (the entry removed) when they
    do not. Iterate once, then `aclose()` (also safe when the iteration stopped early).
    """

    def __init__(
        self,
        meta: EntryMeta,
        response: aiohttp.ClientResponse,
        *,
        chunk_size: int,
        read_timeout: float,
        on_corrupt: Callable[[], Awaitable[None]],
        on_broken: Callable[[], None],
    ) -> None:
        self.meta = meta
        self._response = response
        self._chunk_size = chunk_size
        self._read_timeout = read_timeout
        self._on_corrupt = on_corrupt
        self._on_broken = on_broken
        self._iterator: AsyncGenerator[bytes, None] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._iterator is not None:
            raise RuntimeError("a StreamedEntry can be iterated only once")
        self._iterator = self._chunks()
        return self._iterator

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        if self._iterator is not None:
            await self._iterator.aclose()
        self._release()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        expected = self.meta.length
        digest = hashlib.sha256()
        received = 0
        try:
            while True:
                chunk = await self._read()
                received += len(chunk)
                if not chunk or received > expected:
                    break
                digest.update(chunk)
                if received < expected:
                    yield chunk
                    continue
                # The final chunk: only released once the whole object is known to be intact.
                if digest.hexdigest() == self.meta.body_sha256 and not await self._read():
                    self._release()
                    yield chunk
                    return
                break
            if received == expected == 0 and digest.hexdigest() == self.meta.body_sha256:
                return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._on_broken()
            raise VolumeUnavailable(
                f"the Volume download broke off ({type(exc).__name__})"
            ) from None
        finally:
            self._release()
        await self._on_corrupt()
        raise CorruptEntry("the Volume object failed its integrity check; entry removed")

    async def _read(self) -> bytes:
        async with asyncio.timeout(self._read_timeout):
            return await self._response.content.read(self._chunk_size)

    def _release(self) -> None:
        if self._response.closed:
            return
        if self._response.content.at_eof():
            self._response.release()
        else:
            # Bytes left unread: the connection cannot be reused.
            self._response.close()


class DatabricksVolume:
    """The durable tier on a Unity Catalog Volume, through the Files API over aiohttp.

    Layout and integrity rules are the LocalVolume's: `{path}/{prefix}/{user}/{thread}/{message}/`
    holds `{voice}.{ext}` and its `{voice}.meta.json` sidecar, the object is written first and the
    sidecar last, and an object whose length or sha256 disagrees with its sidecar is a miss that
    removes both. Credentials come from databricks-sdk's unified auth (`auth = "app"`) or from the
    on-behalf-of token of the request being served (`auth = "user"`, `CURRENT_TOKEN`).
    """

    name = "volume"

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
        chunk_size: int = _CHUNK_SIZE,
    ) -> None:
        self.root = _volume_root(settings.path)
        segments = settings.prefix.split("/")
        if not all(valid_id(segment) for segment in segments):
            raise ValueError(f"invalid volume prefix: {settings.prefix!r}")
        self.base = "/".join([self.root, *segments])
        self.auth: Literal["app", "user"] = settings.auth
        self.timeout_seconds = settings.timeout_seconds
        self.retries = max(0, settings.retries)
        self.breaker = CircuitBreaker(
            max(1, settings.failure_threshold), max(0.0, settings.cooldown_seconds), clock=clock
        )
        self.chunk_size = chunk_size
        self._config = config
        self._config_options = dict(config_options or {})
        explicit_host = host or (config.host if config is not None else None)
        self._host = _normalise_host(explicit_host) if explicit_host else None
        self._session = session
        self._owns_session = session is None
        self._jitter = jitter
        self._config_lock = asyncio.Lock()
        self._auth_lock = asyncio.Lock()
        self._app_headers: dict[str, str] | None = None
        self._app_headers_until = 0.0
        # Serialise operations on one key in this process, so a reader never pairs an old
        # sidecar with a new object (and removes a good entry as corrupt).
        self._stripes = tuple(asyncio.Lock() for _ in range(_LOCK_STRIPES))
        # Folders the orphan walk has still to list; it resumes here on the next call.
        self._orphan_walk: list[str] = []

    @property
    def breaker_state(self) -> BreakerState:
        """closed, open or half-open."""
        return self.breaker.state

    # The Tier protocol

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry under `key`, or None; a torn, corrupt or malformed entry is removed."""
        _require_valid(key)
        if self._skipped(key):
            return None
        # Reads take no lock: the seed design's replays read one hot key from every client at
        # once. A read racing a write may see the old sidecar beside the new object; the
        # removal then re-reads the sidecar first, so at worst one entry is lost (a later
        # miss), and no client is ever served bytes that fail their digest.
        return await self._guarded(key.digest(), lambda call: self._get(call, key))

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`: object first, sidecar last, both overwritten in place."""
        _require_valid(key)
        if not entry.intact():
            raise ValueError("entry body disagrees with its metadata")
        if self._skipped(key):
            return
        async with self._stripe(key):
            await self._guarded(key.digest(), lambda call: self._put(call, key, entry))

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        _require_valid(key)
        if self._skipped(key):
            return
        async with self._stripe(key):
            await self._guarded(key.digest(), lambda call: self._remove_entry(call, key, None))

    async def aclose(self) -> None:
        """Close the HTTP session this tier opened."""
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    # Beyond the protocol

    def location(self, key: CacheKey, content_type: str) -> str:
        """The Volume path of the object for `key` (what the index and legacy metadata record)."""
        _require_valid(key)
        return f"{self._folder(key)}/{key.voice}.{extension_for(content_type)}"

    async def open(self, key: CacheKey) -> StreamedEntry | None:
        """A streamed hit whose first bytes do not wait for the whole object, or None."""
        _require_valid(key)
        if self._skipped(key):
            return None
        return await self._guarded(key.digest(), lambda call: self._open(call, key))

    async def delete_prefix(
        self, user: str, thread_id: str | None = None, message_id: str | None = None
    ) -> int:
        """Remove a user's, a thread's or a message's entries; return how many entries went."""
        target = self._target(user, thread_id, message_id)
        if self._skipped(None):
            return 0
        files, directories = await self._walk(target)
        sidecars = [path for path, _ in files if path.endswith(SIDECAR_SUFFIX)]
        # Sidecars first: from then on readers miss, whatever objects remain.
        for path in sidecars + [path for path, _ in files if not path.endswith(SIDECAR_SUFFIX)]:
            await self._guarded("-", functools.partial(self._delete_file, path=path))
        for path in sorted(directories, key=lambda d: d.count("/"), reverse=True):
            await self._guarded("-", functools.partial(self._delete_directory, path=path))
        return len(sidecars)

    async def list_entries(
        self,
        user: str | None = None,
        thread_id: str | None = None,
        message_id: str | None = None,
    ) -> AsyncIterator[ListedEntry]:
        """Every entry under the base, a user, a thread or a message, walking the paged listing."""
        target = self._target(user, thread_id, message_id) if user is not None else self.base
        if user is None and (thread_id is not None or message_id is not None):
            raise ValueError("thread_id and message_id need user")
        if self._skipped(None):
            return
        files, _ = await self._walk(target)
        for path, last_modified in files:
            key = self._key_of(path)
            if key is not None:
                yield ListedEntry(key, last_modified)

    async def exists(self, key: CacheKey) -> bool:
        """True when `key` has a valid sidecar and its object has the length the sidecar records."""
        _require_valid(key)
        if self._skipped(key):
            # Unknown is not "absent": a False here would drop the entry's index row.
            raise VolumeUnavailable("no credentials to check the Volume with")
        async with self._stripe(key):
            return await self._guarded(key.digest(), lambda call: self._exists(call, key))

    async def scan(self) -> list[StoredEntryInfo]:
        """Every entry with an object, walking every folder.

        The Files API keeps no access times, so last hit = created = the sidecar's last write.
        One listing per folder: with many entries, prefer an index to budget from.
        """
        if self._skipped(None):
            raise VolumeUnavailable("no credentials to walk the Volume with")
        found: list[StoredEntryInfo] = []
        pending = [self.base]
        while pending:
            folder = pending.pop()
            listing = await self._guarded("-", functools.partial(self._listing, folder=folder))
            if listing is None:
                continue
            files, subfolders = listing
            pending.extend(subfolders)
            ids = self._ids_of(folder)
            if ids is not None:
                found.extend(_entries_in(ids, files))
        return found

    async def clean_orphans(self, *, limit: int, older_than: float) -> int:
        """Remove up to `limit` crash leftovers last written before `older_than`; return how many.

        Leftovers are objects without a sidecar and sidecars without an object (judged by name:
        reading every sidecar would cost a call per entry; `get` removes malformed ones). Each
        call lists at most `limit` folders and the walk resumes there on the next call. Empty
        folders are removed too (not counted).
        """
        if self._skipped(None):
            raise VolumeUnavailable("no credentials to walk the Volume with")
        if not self._orphan_walk:
            self._orphan_walk.append(self.base)
        removed = listed = 0
        while self._orphan_walk and listed < limit and removed < limit:
            folder = self._orphan_walk.pop()
            listed += 1
            try:
                listing = await self._guarded("-", functools.partial(self._listing, folder=folder))
            except BaseException:
                self._orphan_walk.append(folder)
                raise
            if listing is None:
                continue
            files, subfolders = listing
            self._orphan_walk.extend(subfolders)
            if not files and not subfolders and folder != self.base:
                await self._guarded("-", functools.partial(self._delete_directory, path=folder))
                continue
            ids = self._ids_of(folder)
            if ids is not None:
                removed += await self._clean_folder(folder, ids, files, older_than, limit - removed)
        return removed

    async def ping(self) -> bool:
        """True when the Volume root answers; False when it does not or the breaker is open."""
        if self._skipped(None):
            # Nobody's token to ask with: report only what the breaker knows.
            return self.breaker.state != "open"
        try:
            reply = await self._guarded(
                "-", lambda call: self._exchange(call, "HEAD", DIRECTORIES_API, self.root)
            )
        except (VolumeUnavailable, VolumeRequestFailed):
            return False
        return 200 <= reply.status < 300

    # Operations, run under _guarded

    async def _get(self, call: _Call, key: CacheKey) -> Entry | None:
        parsed = await self._read_meta(call, key)
        if parsed is None:
            return None
        meta, object_name = parsed
        path = f"{self._folder(key)}/{object_name}"
        reply = await self._exchange(call, "GET", FILES_API, path, limit=meta.length)
        body: bytes | None = None
        if reply.status != 404:
            _check(reply, "GET")
            body = reply.body
        entry = Entry(meta, body) if body is not None else None
        if entry is None or not entry.intact():
            logger.debug("volume entry %s is torn or corrupt: removed", call.digest)
            await self._remove_if_unchanged(call, key, meta, object_name)
            return None
        logger.debug("volume hit %s", call.digest)
        return entry

    async def _open(self, call: _Call, key: CacheKey) -> StreamedEntry | None:
        parsed = await self._read_meta(call, key)
        if parsed is None:
            return None
        meta, object_name = parsed
        path = f"{self._folder(key)}/{object_name}"
        reply = await self._exchange(call, "GET", FILES_API, path, limit=meta.length, stream=True)
        response = reply.response
        if response is None:
            if reply.status != 404:
                _check(reply, "GET")
                return None
            await self._remove_if_unchanged(call, key, meta, object_name)
            return None
        if response.content_length is not None and response.content_length != meta.length:
            response.close()
            logger.debug("volume entry %s has the wrong length: removed", call.digest)
            await self._remove_if_unchanged(call, key, meta, object_name)
            return None

        async def discard() -> None:
            try:
                await self._guarded(
                    call.digest,
                    lambda again: self._remove_if_unchanged(again, key, meta, object_name),
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

    async def _put(self, call: _Call, key: CacheKey, entry: Entry) -> None:
        folder = self._folder(key)
        object_name = f"{key.voice}.{extension_for(entry.meta.content_type)}"
        sidecar = {**entry.meta.to_json(), "object": object_name, "key": _key_json(key)}
        sidecar_bytes = json.dumps(sidecar, separators=(",", ":")).encode()
        await self._upload(call, f"{folder}/{object_name}", entry.body)
        await self._upload(call, self._sidecar_path(key), sidecar_bytes)
        # An earlier recording in another format would linger beside the new one.
        try:
            for name in await self._names(call, folder):
                if name != object_name and _is_object_of(name, key.voice):
                    await self._delete_file(call, f"{folder}/{name}")
        except (VolumeUnavailable, VolumeRequestFailed) as exc:
            logger.debug("volume cleanup after put %s skipped: %s", call.digest, type(exc).__name__)

    async def _read_meta(self, call: _Call, key: CacheKey) -> tuple[EntryMeta, str] | None:
        """The sidecar's metadata and object name; None on a miss (a malformed one is removed)."""
        reply = await self._exchange(
            call, "GET", FILES_API, self._sidecar_path(key), limit=_MAX_SIDECAR_BYTES
        )
        if reply.status == 404:
            logger.debug("volume miss %s", call.digest)
            return None
        _check(reply, "GET")
        parsed = _parse_sidecar(reply.body, key) if reply.body is not None else None
        if parsed is None:
            logger.debug("volume sidecar of %s is malformed: removed", call.digest)
            await self._remove_entry(call, key, None)
        return parsed

    async def _remove_if_unchanged(
        self, call: _Call, key: CacheKey, meta: EntryMeta, object_name: str
    ) -> None:
        """Remove the entry unless another writer replaced its sidecar since it was read."""
        reply = await self._exchange(
            call, "GET", FILES_API, self._sidecar_path(key), limit=_MAX_SIDECAR_BYTES
        )
        if 200 <= reply.status < 300 and reply.body is not None:
            current = _parse_sidecar(reply.body, key)
            if current is not None and current[0] != meta:
                logger.debug("volume entry %s was replaced meanwhile: kept", call.digest)
                return
        await self._remove_entry(call, key, object_name)

    async def _remove_entry(self, call: _Call, key: CacheKey, object_name: str | None) -> None:
        folder = self._folder(key)
        # Sidecar first: from then on a reader sees a miss, whatever objects remain.
        await self._delete_file(call, self._sidecar_path(key))
        if object_name is not None:
            await self._delete_file(call, f"{folder}/{object_name}")
            return
        for name in await self._names(call, folder):
            if _is_object_of(name, key.voice):
                await self._delete_file(call, f"{folder}/{name}")

    async def _exists(self, call: _Call, key: CacheKey) -> bool:
        reply = await self._exchange(
            call, "GET", FILES_API, self._sidecar_path(key), limit=_MAX_SIDECAR_BYTES
        )
        if reply.status == 404:
            return False
        _check(reply, "GET")
        parsed = _parse_sidecar(reply.body, key) if reply.body is not None else None
        if parsed is None:
            return False
        meta, object_name = parsed
        head = await self._exchange(call, "HEAD", FILES_API, f"{self._folder(key)}/{object_name}")
        if head.status == 404:
            return False
        _check(head, "HEAD")
        length = head.headers.get("Content-Length")
        return length is None or length == str(meta.length)

    async def _clean_folder(
        self,
        folder: str,
        ids: tuple[str, str, str],
        files: dict[str, _ListedFile],
        older_than: float,
        limit: int,
    ) -> int:
        """Remove one message folder's leftovers, each voice judged again under its lock."""
        stale = stale_names({name: file.modified for name, file in files.items()}, older_than)
        _, _, temporary = split_names(stale)
        removed = 0
        for name in temporary[:limit]:
            await self._guarded("-", functools.partial(self._delete_file, path=f"{folder}/{name}"))
            removed += 1
        voices = {_voice_of(name) for name in stale if name not in temporary}
        for voice in sorted(voices):
            key = CacheKey(*ids, voice)
            if removed >= limit or not key.valid():
                continue
            async with self._stripe(key):
                clean = functools.partial(
                    self._clean_voice, key=key, older_than=older_than, limit=limit - removed
                )
                removed += await self._guarded(key.digest(), clean)
        return removed

    async def _clean_voice(self, call: _Call, key: CacheKey, older_than: float, limit: int) -> int:
        # A put may have completed the entry since the folder was listed.
        folder = self._folder(key)
        listing = await self._listing(call, folder)
        if listing is None:
            return 0
        mine = {
            name: file.modified
            for name, file in listing[0].items()
            if name == f"{key.voice}{SIDECAR_SUFFIX}" or _is_object_of(name, key.voice)
        }
        doomed = stale_names(mine, older_than)[:limit]
        # Sidecar first: from then on a reader sees a miss, whatever objects remain.
        for name in sorted(doomed, key=lambda name: not name.endswith(SIDECAR_SUFFIX)):
            await self._delete_file(call, f"{folder}/{name}")
        return len(doomed)

    async def _listing(self, call: _Call, folder: str) -> _Listing | None:
        """One folder's files and subfolders (every page), or None when it does not exist."""
        files: dict[str, _ListedFile] = {}
        subfolders: list[str] = []
        page_token: str | None = None
        while True:
            page = await self._list_page(call, folder, page_token)
            if page is None:
                return None
            contents, page_token = page
            for item in contents:
                path = item.get("path")
                if not isinstance(path, str) or not path.startswith(folder + "/"):
                    continue
                name = path[len(folder) + 1 :]
                if not name or "/" in name:
                    continue
                if item.get("is_directory"):
                    subfolders.append(path)
                else:
                    files[name] = _ListedFile(
                        _number(item.get("file_size")), _seconds(item.get("last_modified"))
                    )
            if not page_token:
                return files, subfolders

    # Files API calls

    async def _upload(self, call: _Call, path: str, data: bytes) -> None:
        reply = await self._exchange(
            call,
            "PUT",
            FILES_API,
            path,
            params={"overwrite": "true"},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        _check(reply, "PUT")

    async def _delete_file(self, call: _Call, path: str) -> None:
        reply = await self._exchange(call, "DELETE", FILES_API, path)
        if reply.status != 404:
            _check(reply, "DELETE")

    async def _delete_directory(self, call: _Call, path: str) -> None:
        reply = await self._exchange(call, "DELETE", DIRECTORIES_API, path)
        # 404: already gone; 400: not empty, because someone wrote into it meanwhile.
        if reply.status not in (400, 404):
            _check(reply, "DELETE")

    async def _names(self, call: _Call, folder: str) -> list[str]:
        """The names in one folder (every page), or [] when it does not exist."""
        names: list[str] = []
        page_token: str | None = None
        while True:
            page = await self._list_page(call, folder, page_token)
            if page is None:
                return names
            contents, page_token = page
            names.extend(str(item.get("name", "")) for item in contents)
            if not page_token:
                return names

    async def _list_page(
        self, call: _Call, folder: str, page_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None] | None:
        params = {"page_token": page_token} if page_token else None
        reply = await self._exchange(
            call, "GET", DIRECTORIES_API, folder, params=params, limit=_LISTING_LIMIT
        )
        if reply.status == 404:
            return None
        _check(reply, "GET")
        try:
            data = json.loads(reply.body or b"{}")
        except ValueError:
            raise VolumeRequestFailed("GET", reply.status, "MALFORMED_LISTING") from None
        if not isinstance(data, dict):
            raise VolumeRequestFailed("GET", reply.status, "MALFORMED_LISTING")
        contents = [item for item in data.get("contents", []) if isinstance(item, dict)]
        token = data.get("next_page_token")
        return contents, token if isinstance(token, str) and token else None

    async def _walk(self, target: str) -> tuple[list[tuple[str, float | None]], list[str]]:
        """Every file (path, modified seconds) and directory under `target`, target included."""
        files: list[tuple[str, float | None]] = []
        directories: list[str] = []
        pending = [target]
        while pending:
            folder = pending.pop()
            page_token: str | None = None
            while True:
                list_page = functools.partial(self._list_page, folder=folder, page_token=page_token)
                page = await self._guarded("-", list_page)
                if page is None:
                    break
                if folder not in directories:
                    directories.append(folder)
                contents, page_token = page
                for item in contents:
                    path = item.get("path")
                    if not isinstance(path, str) or not path.startswith(folder + "/"):
                        continue
                    if item.get("is_directory"):
                        pending.append(path)
                    else:
                        modified = item.get("last_modified")
                        seconds = modified / 1000 if isinstance(modified, int | float) else None
                        files.append((path, seconds))
                if not page_token:
                    break
        return files, directories

    async def _exchange(
        self,
        call: _Call,
        method: str,
        api: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        limit: int = _ERROR_BODY_LIMIT,
        stream: bool = False,
    ) -> _Reply:
        """One Files API call, retried on 429/5xx and connection errors within the call's deadline.

        Returns the first answer that retrying would not change (2xx, 404, other 4xx).
        """
        # quote() keeps "/" and escapes the rest, as databricks-sdk does for these paths.
        url = f"{call.host}{api}{quote(path)}"
        request_headers = {**call.headers, **(headers or {})}
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            remaining = call.deadline - loop.time()
            if remaining <= 0:
                raise VolumeUnavailable(f"Files API {method} timed out")
            retry_after: float | None = None
            try:
                async with asyncio.timeout(remaining):
                    reply = await self._attempt(
                        method, url, request_headers, params, data, limit, stream
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            else:
                if reply.status not in RETRYABLE_STATUSES:
                    if reply.status == 401:
                        self._app_headers = None
                    return reply
                reason = str(reply.status)
                retry_after = _retry_after(reply.headers)
            attempt += 1
            if attempt > self.retries:
                raise VolumeUnavailable(
                    f"Files API {method} failed after {attempt} attempts ({reason})"
                )
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if loop.time() + delay >= call.deadline:
                raise VolumeUnavailable(f"Files API {method} failed ({reason}); no time to retry")
            logger.debug(
                "volume %s retry %d in %.2fs after %s for %s",
                method,
                attempt,
                delay,
                reason,
                call.digest,
            )
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        data: bytes | None,
        limit: int,
        stream: bool,
    ) -> _Reply:
        response = await self._client_session().request(
            method, url, headers=headers, params=params, data=data, allow_redirects=False
        )
        if stream and response.status == 200:
            # The caller streams the body and releases the response.
            return _Reply(response.status, response.headers, b"", response)
        try:
            if method == "HEAD":
                body: bytes | None = b""
            else:
                bound = limit if response.status < 300 else _ERROR_BODY_LIMIT
                body = await _read_bounded(response, bound)
            return _Reply(response.status, response.headers, body)
        finally:
            response.release()

    # Plumbing

    async def _guarded(self, digest: str, operation: Callable[[_Call], Awaitable[T]]) -> T:
        """Run `operation` behind the breaker, with credentials and a deadline of its own."""
        if not self.breaker.allow():
            raise VolumeUnavailable("the Volume circuit breaker is open")
        try:
            deadline = asyncio.get_running_loop().time() + self.timeout_seconds
            host, headers = await self._credentials(deadline)
            result = await operation(_Call(host, headers, deadline, digest))
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

    async def _credentials(self, deadline: float) -> tuple[str, dict[str, str]]:
        """The workspace URL and the auth headers for one operation."""
        if self.auth == "user":
            token = CURRENT_TOKEN.get()
            if not token:
                raise VolumeUnavailable("no on-behalf-of token for this request")
            host = self._host or _env_host()
            if host is None:
                host = _normalise_host((await self._app_config(deadline)).host or "")
            if not host:
                raise VolumeUnavailable("no Databricks host is configured")
            self._host = host
            return host, {"Authorization": f"Bearer {token}"}
        config = await self._app_config(deadline)
        host = self._host or _normalise_host(config.host or "")
        if not host:
            raise VolumeUnavailable("no Databricks host is configured")
        self._host = host
        loop = asyncio.get_running_loop()
        headers = self._app_headers
        if headers is None or loop.time() >= self._app_headers_until:
            # One refresh at a time; the others reuse what it fetched.
            async with self._auth_lock:
                headers = self._app_headers
                if headers is None or loop.time() >= self._app_headers_until:
                    headers = await self._refresh_app_headers(config, deadline)
        return host, headers

    async def _refresh_app_headers(self, config: Config, deadline: float) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                fresh = await asyncio.to_thread(config.authenticate)
        except TimeoutError:
            raise VolumeUnavailable("Databricks authentication timed out") from None
        except Exception as exc:
            logger.warning("databricks volume: authentication failed: %s", type(exc).__name__)
            raise VolumeUnavailable("Databricks authentication failed") from None
        headers = dict(fresh)
        if config.workspace_id:
            headers["X-Databricks-Workspace-Id"] = str(config.workspace_id)
        self._app_headers = headers
        self._app_headers_until = loop.time() + _AUTH_CACHE_SECONDS
        return headers

    async def _app_config(self, deadline: float) -> Config:
        """databricks-sdk's unified auth Config, built once in a thread (it may call the host)."""
        if self._config is not None:
            return self._config
        async with self._config_lock:
            if self._config is None:
                options = dict(self._config_options)
                if self._host and "host" not in options:
                    options["host"] = self._host
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                try:
                    async with asyncio.timeout(remaining):
                        self._config = await asyncio.to_thread(_build_config, options)
                except TimeoutError:
                    raise VolumeUnavailable("Databricks configuration timed out") from None
                except Exception as exc:
                    # The SDK masks secrets in its messages; scrub known ones all the same.
                    message = _scrub(str(exc), options)
                    logger.warning("databricks volume: configuration failed: %s", message)
                    raise VolumeUnavailable("Databricks configuration failed") from None
            return self._config

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": "tts-cache-proxy databricks-volume"},
            )
            self._owns_session = True
        return self._session

    def _skipped(self, key: CacheKey | None) -> bool:
        if self.auth == "user" and not CURRENT_TOKEN.get():
            logger.debug(
                "volume skipped for %s: no on-behalf-of token", key.digest() if key else "-"
            )
            return True
        return False

    def _backoff(self, attempt: int) -> float:
        ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + self._jitter() / 2)

    def _stripe(self, key: CacheKey) -> asyncio.Lock:
        return self._stripes[hash(key) % _LOCK_STRIPES]

    def _folder(self, key: CacheKey) -> str:
        return f"{self.base}/{key.user}/{key.thread_id}/{key.message_id}"

    def _sidecar_path(self, key: CacheKey) -> str:
        return f"{self._folder(key)}/{key.voice}{SIDECAR_SUFFIX}"

    def _target(self, user: str, thread_id: str | None, message_id: str | None) -> str:
        if message_id is not None and thread_id is None:
            raise ValueError("message_id needs thread_id")
        parts = [part for part in (user, thread_id, message_id) if part is not None]
        if not all(valid_id(part) for part in parts):
            raise ValueError("invalid id")
        return "/".join([self.base, *parts])

    def _ids_of(self, folder: str) -> tuple[str, str, str] | None:
        """(user, thread, message) when `folder` is a message folder, else None."""
        if not folder.startswith(self.base + "/"):
            return None
        parts = folder[len(self.base) + 1 :].split("/")
        if len(parts) != 3 or not all(valid_id(part) for part in parts):
            return None
        return parts[0], parts[1], parts[2]

    def _key_of(self, sidecar_path: str) -> CacheKey | None:
        if not sidecar_path.startswith(self.base + "/") or not sidecar_path.endswith(
            SIDECAR_SUFFIX
        ):
            return None
        parts = sidecar_path[len(self.base) + 1 : -len(SIDECAR_SUFFIX)].split("/")
        if len(parts) != 4:
            return None
        key = CacheKey(*parts)
        return key if key.valid() else None


def _check(reply: _Reply, method: str) -> None:
    """Raise for an answer that is not a success."""
    if 200 <= reply.status < 300:
        return
    raise VolumeRequestFailed(method, reply.status, _error_code(reply.body))


def _error_code(body: bytes | None) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    code = data.get("error_code") if isinstance(data, dict) else None
    # Only a well-formed code: it goes into an exception message.
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit`."""
    if response.content_length is not None and response.content_length > limit:
        return None
    data = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK_SIZE):
        data.extend(chunk)
        if len(data) > limit:
            return None
    return bytes(data)


def _retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _entries_in(ids: tuple[str, str, str], files: dict[str, _ListedFile]) -> list[StoredEntryInfo]:
    sidecars, objects, _ = split_names(files)
    found: list[StoredEntryInfo] = []
    for voice, sidecar in sidecars.items():
        names = objects.get(voice)
        key = CacheKey(*ids, voice)
        if not names or not key.valid():
            continue
        written = files[sidecar].modified or max(files[name].modified or 0.0 for name in names)
        size = sum(files[name].size or 0 for name in names)
        found.append(StoredEntryInfo(key, size, created_at=written, last_hit_at=written))
    return found


def _voice_of(name: str) -> str:
    if name.endswith(SIDECAR_SUFFIX):
        return name[: -len(SIDECAR_SUFFIX)]
    return name.rpartition(".")[0]


def _number(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _seconds(milliseconds: Any) -> float | None:
    number = _number(milliseconds)
    return number / 1000 if number is not None else None


def _is_object_of(name: str, voice: str) -> bool:
    stem, dot, extension = name.rpartition(".")
    return bool(dot) and stem == voice and extension in OBJECT_EXTENSIONS


def _volume_root(path: str) -> str:
    root = path.rstrip("/")
    segments = root.split("/")
    if (
        not root.startswith("/Volumes/")
        or len(segments) < 5
        or any(segment in ("", ".", "..") for segment in segments[1:])
        or any(ord(character) < 32 for character in root)
    ):
        raise ValueError(
            f"cache.volume.path must be /Volumes/<catalog>/<schema>/<volume>, got {path!r}"
        )
    return root


def _normalise_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if host and "://" not in host:
        host = f"https://{host}"
    return host


def _env_host() -> str | None:
    host = os.environ.get("DATABRICKS_HOST", "").strip()
    return _normalise_host(host) if host else None


def _build_config(options: Mapping[str, Any]) -> Config:
    try:
        from databricks.sdk.config import Config
    except ImportError as exc:  # pragma: no cover - databricks-sdk is a dependency
        raise VolumeUnavailable(
            "install databricks-sdk to use cache.volume.kind = databricks"
        ) from exc
    return Config(**options)


def _scrub(message: str, options: Mapping[str, Any]) -> str:
    secrets = [str(options[name]) for name in _SECRET_OPTIONS if options.get(name)]
    secrets += [os.environ[name] for name in _SECRET_ENV if os.environ.get(name)]
    for secret in secrets:
        message = message.replace(secret, "***")
    return message
