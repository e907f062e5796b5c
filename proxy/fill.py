"""One upstream fill per key: its chunks stream to every request that joins it, and to the cache."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from itertools import count

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import X_TTS_PROVIDER
from proxy.policy import storable_head
from proxy.speak import CacheKey
from proxy.storage.entry import Entry, stored_header
from proxy.upstreams.base import SpeakCall, Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

FlightKey = tuple[CacheKey, str, str | None]
# Past the entry limit, a fill keeps at most this much unread by its slowest client.
BACKLOG_BYTES = 4 * 1024 * 1024
# The waiter id of the fill's own task (readers' ids count up from 0).
_SELF = -1


class FillBroken(Exception):
    """The upstream body ended early: a client must not take what it got as complete."""


class Fill:
    """An upstream response being read once and shared by every request that joined it."""

    def __init__(
        self,
        key: CacheKey,
        call: SpeakCall,
        *,
        text_sha256: str,
        max_entry_bytes: int,
        on_commit: Callable[[CacheKey, Entry], None],
        store_allowed: bool = True,
    ) -> None:
        self.key = key
        self.call = call
        self.text_sha256 = text_sha256
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] | CIMultiDict[str] = CIMultiDict()
        self.upstream_seconds: float | None = None
        self.error: UpstreamError | None = None
        self.storable = False
        self._store_allowed = store_allowed
        self.joinable = True
        self.stored = False
        self.done = False
        self.broken = False
        self.received = 0
        self.task: asyncio.Task[None] | None = None
        self._max_entry_bytes = max_entry_bytes
        self._on_commit = on_commit
        self._chunks: list[bytes] = []
        # Bytes that came with the head, held for the body task when clients joined (see _open).
        self._held = b""
        self._offset = 0
        self._readers: dict[int, int] = {}
        self._reader_ids = count()
        self._ready = asyncio.Event()
        # Who waits for the fill to move on: each reader (by id) and the fill's own task
        # (_SELF), each on a future of its own, so one cancelled waiter disturbs no other.
        self._waiters: dict[int, asyncio.Future[None]] = {}

    async def lead(self, upstream: Upstream, on_end: Callable[[Fill], None]) -> None:
        """Open the upstream call in the calling task (the first client's), then read the body
        in a task of its own.

        The first client is spared two turns of the event loop, a task starting and a task
        reporting back, on its time to first byte; the body is still read by a task, so that no
        client's pace or departure stops it. aiohttp does not cancel a handler whose client
        left: only a shutdown interrupts the open, and the clients that joined get a 502.
        """
        response = await self._open(upstream, on_end)
        if response is not None:
            self.task = asyncio.create_task(self._body(response, on_end))

    @property
    def store_allowed(self) -> bool:
        """False when the fill was created not to be stored, or a purge forbade it since."""
        return self._store_allowed

    def forbid_store(self) -> None:
        """Never store this fill's response (a purge covers its key); it is still served."""
        self._store_allowed = False

    def reader(self) -> FillReader:
        """A new reader from the first byte; only valid while the fill is joinable."""
        if not self.joinable:
            raise RuntimeError("fill is no longer joinable")
        reader_id = next(self._reader_ids)
        self._readers[reader_id] = 0
        return FillReader(self, reader_id)

    async def wait_ready(self) -> None:
        """Wait for the upstream's status and headers, or its error."""
        await self._ready.wait()

    async def _open(
        self, upstream: Upstream, on_end: Callable[[Fill], None]
    ) -> UpstreamResponse | None:
        """The upstream's response with its head taken in, or None once the fill has ended."""
        response: UpstreamResponse | None = None
        try:
            response = await upstream.open(self.call)
            self.status, self.reason, self.headers = (
                response.status,
                response.reason,
                response.headers,
            )
            self.upstream_seconds = response.upstream_seconds
            self.storable = storable_head(
                self.status,
                self.headers,
                wanted_provider=self.call.speak.provider,
                max_entry_bytes=self._max_entry_bytes,
            )
            first = response.read_buffered()
            if response.body_complete():
                # The whole body came with the head (a short answer): the fill ends in this
                # turn, with no body task to start and no second wake-up of its clients.
                self._accept(first)
                self._ready.set()
                self._end_whole(response, on_end)
                return None
            if len(self._readers) <= 1:
                # What came with the head is the first chunk: the one client gets it without
                # waiting for the body task to start.
                self._accept(first)
            else:
                # Clients joined while the head was awaited: each prepares its response when
                # the head wakes it, and the body task hands the first bytes to all of them in
                # one turn, so every joined client starts within one turn of the first.
                self._held = first
        except UpstreamError as exc:
            self.error = exc
            self.upstream_seconds = exc.upstream_seconds
        except asyncio.CancelledError:
            self.error = UpstreamError(502, "upstream call cancelled")
            self._end(response, on_end)
            raise
        except Exception:
            log.exception("fill for key %s failed", self.key.digest())
            self.error = UpstreamError(502, "upstream failed")
        if self.error is None and response is not None:
            self._ready.set()
            return response
        self._end(response, on_end)
        return None

    async def _body(self, response: UpstreamResponse, on_end: Callable[[Fill], None]) -> None:
        try:
            held, self._held = self._held, b""
            self._accept(held)
            await self._read_body(response)
            # One fill per key: the entry goes into the cache (_commit, without awaiting) before
            # _end takes the fill out of the flight table, in the same turn, so a lookup finds
            # one or the other, never neither (TieredCache keeps it readable until it is stored).
            if self.storable and not self.broken:
                self._commit()
        except asyncio.CancelledError:
            self.broken = True
            raise
        except Exception:
            log.exception("fill for key %s failed", self.key.digest())
            self.broken = True
        finally:
            self._end(response, on_end)

    def _end_whole(self, response: UpstreamResponse, on_end: Callable[[Fill], None]) -> None:
        """End a fill whose whole body came with its head: checked, committed, then ended, in
        one turn (as _body does after the last chunk)."""
        expected = self.headers.get(hdrs.CONTENT_LENGTH)
        if expected is not None and expected.isdigit() and int(expected) != self.received:
            self.broken = True
        if self.storable and not self.broken:
            self._commit()
        self._end(response, on_end)

    def _end(self, response: UpstreamResponse | None, on_end: Callable[[Fill], None]) -> None:
        if response is not None:
            response.close()
        self.done = True
        self._ready.set()
        self._notify()
        on_end(self)

    def _accept(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.received += len(chunk)
        if self.received > self._max_entry_bytes and self.joinable:
            self.storable = False
            self.joinable = False
        self._chunks.append(chunk)
        self._notify()

    async def _read_body(self, response: UpstreamResponse) -> None:
        try:
            async for chunk in response.iter_chunks():
                if not chunk:
                    continue
                self._accept(chunk)
                if not self.storable and not self._readers:
                    log.debug("fill %s: no client left and nothing to store", self.key.digest())
                    self.broken = True
                    return
                if not self.joinable:
                    self._trim()
                    await self._wait_for_slow_readers()
        except UpstreamError:
            self.broken = True
            return
        expected = self.headers.get(hdrs.CONTENT_LENGTH)
        if expected is not None and expected.isdigit() and int(expected) != self.received:
            self.broken = True

    def _commit(self) -> None:
        if not self._store_allowed:
            return
        body = b"".join(self._chunks)
        headers = tuple((k, v) for k, v in self.headers.items() if stored_header(k))
        provider = self.headers.get(X_TTS_PROVIDER) or self.call.speak.provider
        entry = Entry.build(
            body,
            content_type=self.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream"),
            text_sha256=self.text_sha256,
            provider=provider.lower() if provider else None,
            headers=headers,
        )
        self._on_commit(self.key, entry)
        self.stored = True

    def _notify(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = {}
            for waiter in waiters.values():
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self, waiter_id: int) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[waiter_id] = waiter
        try:
            await waiter
        finally:
            if self._waiters.get(waiter_id) is waiter:
                del self._waiters[waiter_id]

    def _trim(self) -> None:
        lowest = min(self._readers.values(), default=self._offset + len(self._chunks))
        drop = lowest - self._offset
        if drop > 0:
            del self._chunks[:drop]
            self._offset = lowest

    async def _wait_for_slow_readers(self) -> None:
        while self._readers and sum(len(c) for c in self._chunks) > BACKLOG_BYTES:
            await self._wait(_SELF)
            self._trim()

    async def _next_chunk(self, reader_id: int) -> bytes | None:
        while True:
            position = self._readers[reader_id]
            index = position - self._offset
            if index < len(self._chunks):
                self._readers[reader_id] = position + 1
                if not self.joinable:
                    self._notify()
                return self._chunks[index]
            if self.done:
                if self.broken:
                    raise FillBroken()
                return None
            await self._wait(reader_id)

    def _leave(self, reader_id: int) -> None:
        self._readers.pop(reader_id, None)
        self._notify()


class FillReader:
    """One client's position in a fill."""

    def __init__(self, fill: Fill, reader_id: int) -> None:
        self._fill = fill
        self._id = reader_id
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self._closed:
            chunk = await self._fill._next_chunk(self._id)
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        """Stop reading; the fill goes on for the others and for the cache."""
        if not self._closed:
            self._closed = True
            self._fill._leave(self._id)


class Flights:
    """The fills in progress, one per (key, text digest, provider)."""

    def __init__(self) -> None:
        self._fills: dict[FlightKey, Fill] = {}
        self._all: set[Fill] = set()

    def joinable(self, flight: FlightKey) -> Fill | None:
        """The fill a new request for `flight` can join, if any."""
        fill = self._fills.get(flight)
        return fill if fill is not None and fill.joinable and not fill.done else None

    async def lead(self, flight: FlightKey, fill: Fill, upstream: Upstream) -> None:
        """Register `fill` under `flight` and open it in the calling task (see Fill.lead)."""
        await fill.lead(upstream, self._register(flight, fill))

    def _register(self, flight: FlightKey, fill: Fill) -> Callable[[Fill], None]:
        self._fills[flight] = fill
        self._all.add(fill)

        def on_end(ended: Fill) -> None:
            if self._fills.get(flight) is ended:
                del self._fills[flight]
            self._all.discard(ended)

        return on_end

    def cancel_store(self, predicate: Callable[[CacheKey], bool]) -> int:
        """Forbid storing any in-flight fill whose key matches; returns how many."""
        hit = [f for f in self._all if predicate(f.key)]
        for fill in hit:
            fill.forbid_store()
        return len(hit)

    def __len__(self) -> int:
        return len(self._all)

    async def aclose(self, grace_seconds: float = 5.0) -> None:
        """Let fills in progress finish, then cancel what is left."""
        tasks = [f.task for f in self._all if f.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
