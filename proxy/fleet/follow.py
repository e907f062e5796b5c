"""Following another replica's fill: wait for its recording's notice, then read the Volume.

A replica that finds a recording's fill lease held (proxy/index/fill_leases.py) waits for the
holder's `stored` notice (sent once the recording is on the Volume, proxy/fleet/broadcast.py),
then reads the Volume and answers from it (`VolumeResponse`). It does not wait forever: every
`FOLLOW_POLL_SECONDS` it asks whether the lease could be taken (the holder gave it back without
a recording, died, or let it expire) and takes it; past `fleet.wait_seconds` it fills the key
itself. The trade-off: a follower's first byte comes after the leader's whole fill and its
Volume write, where its own synthesis would have streamed from the upstream's first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Final, NamedTuple

from aiohttp import hdrs
from multidict import CIMultiDict

from proxy.headers import X_TTS_PROVIDER
from proxy.index.fill_leases import FillLeases
from proxy.index.pool import IndexUnavailable
from proxy.policy import entry_matches
from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import CorruptEntry, EntryStream
from proxy.upstreams.base import UpstreamError

log = logging.getLogger(__name__)

# How often a follower asks whether the lease it waits on could be taken (its holder gave it
# back, died, or let it expire): the bound on noticing a dead leader, once PostgreSQL has.
FOLLOW_POLL_SECONDS: Final = 0.5

Found = Entry | EntryStream


class StoredNotices:
    """Who in this process waits for a key's recording, woken by `stored` notices."""

    def __init__(self) -> None:
        self._waiting: dict[CacheKey, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def waiter(self, key: CacheKey) -> Iterator[asyncio.Event]:
        """An event set whenever a recording of `key` is announced, while in the block."""
        event = asyncio.Event()
        events = self._waiting.setdefault(key, set())
        events.add(event)
        try:
            yield event
        finally:
            events.discard(event)
            if not events:
                self._waiting.pop(key, None)

    def notify(self, key: CacheKey) -> None:
        """A recording of `key` is on the Volume: wake whoever waits for it."""
        for event in self._waiting.get(key, ()):
            event.set()

    def __len__(self) -> int:
        return sum(len(events) for events in self._waiting.values())


class Followed(NamedTuple):
    """How a follow ended: the recording found (else None), whether this process now holds
    the lease, and the outcome counted (followed, takeover, wait_timeout, lease_unavailable)."""

    found: Found | None
    leased: bool
    outcome: str


class Follow:
    """One recording waited for: its key, what it must match, and its lease's name."""

    def __init__(
        self,
        key: CacheKey,
        text_sha256: str,
        provider: str | None,
        lease: str,
        *,
        cache: TieredCache,
        leases: FillLeases,
        notices: StoredNotices,
        poll_seconds: float = FOLLOW_POLL_SECONDS,
    ) -> None:
        self.key = key
        self.text_sha256 = text_sha256
        self.provider = provider
        self.lease = lease
        self._cache = cache
        self._leases = leases
        self._notices = notices
        self._poll = poll_seconds

    async def wait(self, wait_seconds: float) -> Followed:
        """Wait for the recording (or for the lease to come free) at most `wait_seconds`."""
        deadline = time.monotonic() + wait_seconds
        with self._notices.waiter(self.key) as announced:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Followed(None, False, "wait_timeout")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(announced.wait(), min(self._poll, left))
                if announced.is_set():
                    announced.clear()
                    found = await self.read()
                    if found is not None:
                        return Followed(found, False, "followed")
                    continue  # another text's recording, or the Volume did not answer
                try:
                    if not await self._leases.takeable(self.lease):
                        continue
                    if not await self._leases.take(self.lease):
                        continue
                except IndexUnavailable:
                    return Followed(None, False, "lease_unavailable")
                # The holder may have stored it and given the lease back between two polls.
                found = await self.read()
                return Followed(found, True, "followed" if found is not None else "takeover")

    async def read(self) -> Found | None:
        """The Volume's recording of this key, when it is the one asked for."""
        found = await self._cache.open_volume(self.key)
        if found is None:
            return None
        if entry_matches(found.meta, self.text_sha256, self.provider):
            return found
        if not isinstance(found, Entry):
            await found.aclose()
        return None


class VolumeResponse:
    """A recording read from the Volume, answered as an upstream response (a follower's fill)."""

    def __init__(self, found: Found) -> None:
        self._found = found
        meta = found.meta
        self.status = meta.status
        self.reason: str | None = None
        self.upstream_seconds: float | None = None
        headers: CIMultiDict[str] = CIMultiDict(meta.headers)
        headers[hdrs.CONTENT_TYPE] = meta.content_type
        headers[hdrs.CONTENT_LENGTH] = str(meta.length)
        if meta.provider and X_TTS_PROVIDER not in headers:
            headers[X_TTS_PROVIDER] = meta.provider
        self.headers = headers
        self._closing: asyncio.Task[None] | None = None

    def read_buffered(self) -> bytes:
        """A whole entry at once; nothing yet for a stream."""
        return self._found.body if isinstance(self._found, Entry) else b""

    def body_complete(self) -> bool:
        """A whole entry came in read_buffered; a stream's body is still to come."""
        return isinstance(self._found, Entry)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """A stream's chunks, checked as they come (UpstreamError when corrupt)."""
        found = self._found
        if isinstance(found, Entry):
            return
        try:
            async for chunk in found:
                yield chunk
        except CorruptEntry:
            raise UpstreamError(502, "the recording on the Volume is corrupt") from None
        except OSError as exc:
            raise UpstreamError(502, f"the Volume failed: {type(exc).__name__}") from None

    def close(self) -> None:
        """Release a stream's connection (in a task: closing it awaits)."""
        found = self._found
        if not isinstance(found, Entry) and self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(found.aclose())
