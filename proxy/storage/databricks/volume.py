"""DatabricksVolume: the durable tier on a Unity Catalog Volume, through the Files API."""

from __future__ import annotations

import asyncio
import functools
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
from proxy.storage.databricks.entry_files import EntryFiles
from proxy.storage.databricks.files_api import (
    DIRECTORIES_API,
    FILES_API,
    READ_CHUNK_BYTES,
    Call,
    FilesApi,
    VolumeRequestFailed,
    check,
)
from proxy.storage.databricks.limiter import CallLimiter
from proxy.storage.databricks.maintenance import VolumeWalks
from proxy.storage.databricks.paths import VolumePaths
from proxy.storage.databricks.streamed import StreamedEntry
from proxy.storage.entry import Entry, EntryInfo, EntryMeta
from proxy.storage.layout import object_name, require_valid
from proxy.storage.tiers import CallStats, CorruptEntry, VolumeBusy, VolumeUnavailable

if TYPE_CHECKING:
    from databricks.sdk.config import Config

_LOCK_STRIPES = 64

T = TypeVar("T")
logger = logging.getLogger(__name__)


class DatabricksVolume:
    """The durable tier on a Unity Catalog Volume, through the Files API over aiohttp.

    Layout and integrity rules are every Volume's (`proxy.storage.layout`). Every operation runs
    behind a circuit breaker with a deadline of its own (a lookup's answer within the lookup
    budget, see DurableTier). Credentials come from databricks-sdk's unified auth (`auth = "app"`)
    or from the on-behalf-of token of the request being served
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
        self.lookup_budget_seconds = settings.lookup_budget_ms / 1000
        self.verify_max_bytes = settings.verify_max_bytes
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
            limiter=CallLimiter(settings.max_concurrent_calls, settings.max_calls_per_second),
        )
        # Writes and checks of one key (put, delete, exists, orphan removal) take its stripe in
        # this process, so a check never judges a half-written entry and removes a good one.
        # The stripes also bound the writes in flight: each one started can finish in budget.
        self._stripes = tuple(asyncio.Lock() for _ in range(_LOCK_STRIPES))
        self._files = EntryFiles(self._api, self.paths)
        self._walks = VolumeWalks(self.paths, self._api, self._guarded, self._stripe)
        self._corrupt = 0
        # Removals of torn or corrupt entries found by lookups, run behind them (strong refs).
        self._removals: set[asyncio.Task[None]] = set()

    @property
    def breaker_state(self) -> BreakerState:
        """closed, open or half-open."""
        return self.breaker.state

    @property
    def walkable(self) -> bool:
        """False with `auth = "user"`: outside a request there is no token to list with."""
        return self.auth != "user"

    @property
    def corrupt_entries(self) -> int:
        """Entries found corrupt by a read since start (each removed)."""
        return self._corrupt

    def describe(self) -> str:
        """The kind and the breaker's state, as the dashboard shows them."""
        return f"Databricks, breaker {self.breaker.state}"

    def call_stats(self) -> CallStats:
        """Files API attempts by method and outcome, and the time spent waiting for the limiter."""
        return CallStats(dict(self._api.calls), self._api.limiter.wait_seconds)

    # The Tier protocol

    async def get(self, key: CacheKey) -> Entry | None:
        """The entry under `key` read whole and checked, or None; a bad one is removed."""
        found = await self.open(key)
        if not isinstance(found, StreamedEntry):
            return found
        try:
            body = b"".join([chunk async for chunk in found])
        except CorruptEntry:
            return None
        finally:
            await found.aclose()
        return Entry(found.meta, body)

    async def put(self, key: CacheKey, entry: Entry) -> None:
        """Store `entry` under `key`: object first, sidecar last, both overwritten in place."""
        require_valid(key)
        if not entry.intact():
            raise ValueError("entry body disagrees with its metadata")
        if self._skipped(key):
            return
        # Its calls, their wait for the call budget included, have timeout_seconds; a write the
        # budget cannot start in that time is refused as busy (VolumeBusy), not as a failure.
        async with self._stripe(key):
            write = functools.partial(self._files.write, key=key, entry=entry)
            await self._guarded(key.digest(), write)

    async def delete(self, key: CacheKey) -> None:
        """Remove the entry under `key`, if any."""
        require_valid(key)
        if self._skipped(key):
            return
        async with self._stripe(key):
            await self._guarded(key.digest(), lambda call: self._files.remove(call, key, None))

    async def aclose(self) -> None:
        """Let removals under way finish (each within its deadline), close the HTTP session."""
        await self.settle()
        await self._api.aclose()

    async def settle(self) -> None:
        """Wait for the removals that lookups started (of torn or corrupt entries) to end."""
        while self._removals:
            await asyncio.wait(list(self._removals))

    # The DurableTier protocol

    def get_nowait(self, key: CacheKey) -> Entry | None:
        """Always None: a Databricks read always awaits the network (ask `open`)."""
        return None

    async def open(self, key: CacheKey) -> Entry | StreamedEntry | None:
        """A hit checked whole (up to verify_max_bytes) or streamed with its last chunk held.

        None on a miss, and on a torn or corrupt entry, removed behind the answer.
        """
        require_valid(key)
        if self._skipped(key):
            return None
        # Reads take no lock: a hot key is read by every client at once. A read racing a write
        # may see the old sidecar beside the new object; the removal then re-reads the sidecar
        # first, so at worst one entry is lost (a later miss), and no client is ever served
        # bytes that fail their digest.
        return await self._guarded(
            key.digest(), lambda call: self._open(call, key), budget=self.lookup_budget_seconds
        )

    async def read_meta(self, key: CacheKey) -> EntryMeta | None:
        """The sidecar's metadata; None when absent, malformed (kept) or without a token."""
        require_valid(key)
        if self._skipped(key):
            return None
        _, parsed = await self._guarded(key.digest(), lambda call: self._files.sidecar(call, key))
        return parsed[0] if parsed is not None else None

    async def exists(self, key: CacheKey) -> bool:
        """True when `key` has a valid sidecar and its object has the length the sidecar records."""
        require_valid(key)
        if self._skipped(key):
            # Unknown is not "absent": a False here would drop the entry's index row.
            raise VolumeUnavailable("no credentials to check the Volume with")
        async with self._stripe(key):
            return await self._guarded(key.digest(), lambda call: self._files.exists(call, key))

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

    async def _open(self, call: Call, key: CacheKey) -> Entry | StreamedEntry | None:
        found, parsed = await self._files.sidecar(call.answer_only(), key)
        if parsed is None:
            if found:
                logger.debug("volume sidecar of %s is malformed", call.digest)
                self._discard(key, None, None, corrupt=True)
            else:
                logger.debug("volume miss %s", call.digest)
            return None
        meta, name = parsed
        path = self._files.object_path(key, name)
        if meta.length <= self.verify_max_bytes:
            # Checked whole before the first byte leaves: a bad object is then a plain miss.
            reply = await self._api.exchange(call, "GET", FILES_API, path, limit=meta.length)
            if reply.status == 404:
                self._discard(key, meta, name, corrupt=False)
                return None
            check(reply, "GET")
            entry = Entry(meta, reply.body) if reply.body is not None else None
            if entry is None or not entry.intact():
                self._discard(key, meta, name, corrupt=True)
                return None
            logger.debug("volume hit %s", call.digest)
            return entry
        reply = await self._api.exchange(
            call, "GET", FILES_API, path, limit=meta.length, stream=True
        )
        response = reply.response
        if response is None:
            if reply.status != 404:
                check(reply, "GET")
                return None
            self._discard(key, meta, name, corrupt=False)
            return None
        if response.content_length is not None and response.content_length != meta.length:
            response.close()
            self._discard(key, meta, name, corrupt=True)
            return None
        logger.debug("volume streamed hit %s", call.digest)
        return StreamedEntry(
            meta,
            response,
            chunk_size=self.chunk_size,
            read_timeout=self.timeout_seconds,
            on_corrupt=lambda: self._discard(key, meta, name, corrupt=True),
            on_broken=self.breaker.record_failure,
        )

    def _discard(
        self, key: CacheKey, meta: EntryMeta | None, name: str | None, *, corrupt: bool
    ) -> None:
        """Remove a torn or corrupt entry behind the lookup, which answers a miss at once."""
        if corrupt:
            self._corrupt += 1
            logger.warning("volume entry %s failed its integrity check: removed", key.digest())
        task = asyncio.get_running_loop().create_task(self._remove(key, meta, name))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove(self, key: CacheKey, meta: EntryMeta | None, name: str | None) -> None:
        # Under the key's stripe: a write of a fresh entry waits, or is seen and kept.
        try:
            async with self._stripe(key):
                await self._guarded(
                    key.digest(), lambda c: self._files.remove_if_unchanged(c, key, meta, name)
                )
        except Exception as exc:
            logger.debug("volume removal of %s failed: %s", key.digest(), type(exc).__name__)

    # Plumbing

    async def _guarded(
        self,
        digest: str,
        operation: Callable[[Call], Awaitable[T]],
        *,
        budget: float | None = None,
    ) -> T:
        """Run `operation` behind the breaker, with credentials and a deadline of its own.

        The deadline is `timeout_seconds` away. A lookup passes its
        `budget`: its answer (credentials, sidecar, the object's response head) is due within
        it, and a body then has `timeout_seconds`. Running out of time is a failure, like an
        error; a call the budget could not start (VolumeBusy) is not.
        """
        if not self.breaker.allow():
            raise VolumeUnavailable("the Volume circuit breaker is open")
        start = asyncio.get_running_loop().time()
        answer_by = None if budget is None else start + budget
        deadline = (start if answer_by is None else answer_by) + self.timeout_seconds
        try:
            async with asyncio.timeout_at(deadline):
                host, headers = await self._credentials.for_call(answer_by or deadline)
                result = await operation(Call(host, headers, deadline, digest, answer_by))
        except (asyncio.CancelledError, VolumeBusy):
            self.breaker.release()  # the Volume was not asked: nothing to judge it by
            raise
        except TimeoutError:
            self.breaker.record_failure()
            raise VolumeUnavailable("the Volume did not answer in time") from None
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
