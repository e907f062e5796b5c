"""Who may hold what: upstream slots in two pools with a bounded wait, and requests per client."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.identity import IdentityResolver
from proxy.request_context import Handler
from proxy.routes.responses import refuse
from proxy.settings import UpstreamSettings
from proxy.stats import CacheStats
from proxy.upstreams.base import SpeakCall, Upstream, UpstreamError, UpstreamResponse

# A client over its limit may try again once one of its requests ended: soon.
CLIENT_RETRY_AFTER: Final = "1"


class UpstreamBusy(Exception):
    """No upstream slot came free within upstream.slot_wait_seconds."""


class SlotPool:
    """A fixed number of upstream slots; the wait for one is bounded."""

    def __init__(self, size: int, wait_seconds: float) -> None:
        self._free = asyncio.Semaphore(size)
        self._wait = wait_seconds

    async def acquire(self) -> None:
        """Take a slot, or raise UpstreamBusy when none came free within the wait."""
        if self._free.locked():
            try:
                async with asyncio.timeout(self._wait):
                    await self._free.acquire()
            except TimeoutError:
                raise UpstreamBusy() from None
        else:
            await self._free.acquire()  # a free slot: taken without suspending

    def release(self) -> None:
        """Give a slot back."""
        self._free.release()


class Slot:
    """One upstream slot held by a request; `release()` gives it back, once."""

    __slots__ = ("_pool", "stream")

    def __init__(self, pool: SlotPool, *, stream: bool) -> None:
        self._pool: SlotPool | None = pool
        self.stream = stream

    def release(self) -> None:
        """Give the slot back to its pool (again: nothing)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release()

    def move_to_streams(self, streams: SlotPool) -> None:
        """Hold a slot taken from `streams` instead of this one, which is given back."""
        self.release()
        self._pool, self.stream = streams, True


class UpstreamSlots:
    """The upstream's connections in two pools, so that streams never take what ordinary
    requests need: long-lived streams (server-sent events, WebSockets) get `max_streams`, every
    other request (speak misses included) the rest of `max_connections`. Both sum to the
    connector's own limit, so aiohttp's connector never makes a request wait unbounded."""

    def __init__(self, settings: UpstreamSettings, stats: CacheStats | None = None) -> None:
        wait = settings.slot_wait_seconds
        self.ordinary = SlotPool(settings.max_connections - settings.max_streams, wait)
        self.streams = SlotPool(settings.max_streams, wait)
        self.retry_after = str(max(1, math.ceil(wait)))
        self._wait = wait
        self._stats = stats

    async def take(self, *, stream: bool) -> Slot:
        """A slot from the streams' pool or the ordinary one; UpstreamBusy past the wait."""
        pool = self.streams if stream else self.ordinary
        await self._acquire(pool)
        return Slot(pool, stream=stream)

    async def to_streams(self, slot: Slot) -> None:
        """Move an ordinary request whose answer turned out to be a stream into the streams'
        pool; its ordinary slot is held until then. UpstreamBusy past the wait."""
        await self._acquire(self.streams)
        slot.move_to_streams(self.streams)

    def error(self) -> UpstreamError:
        """What a request that found no slot gets: 503 with Retry-After (RFC 9110 15.6.4)."""
        detail = f"the upstream is busy: no connection came free within {self._wait:g} s"
        return UpstreamError(503, detail, headers={"Retry-After": self.retry_after})

    async def busy(self, request: web.BaseRequest) -> web.StreamResponse:
        """The 503 for `request`, which found no slot."""
        error = self.error()
        return await refuse(request, error.status, error.detail, error.headers)

    async def _acquire(self, pool: SlotPool) -> None:
        try:
            await pool.acquire()
        except UpstreamBusy:
            if self._stats is not None:
                self._stats.errors["upstream_busy"] += 1
            raise


class SlottedUpstream:
    """An Upstream whose every call holds an ordinary slot until its response is closed."""

    def __init__(self, inner: Upstream, slots: UpstreamSlots) -> None:
        self._inner = inner
        self._slots = slots

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """The inner upstream's response, once a slot is free; 503 UpstreamError past the wait."""
        try:
            slot = await self._slots.take(stream=False)
        except UpstreamBusy:
            raise self._slots.error() from None
        try:
            response = await self._inner.open(call)
        except BaseException:
            slot.release()
            raise
        return SlottedResponse(response, slot)


class SlottedResponse:
    """An upstream response that gives its slot back when it is closed."""

    __slots__ = ("_response", "_slot")

    def __init__(self, response: UpstreamResponse, slot: Slot) -> None:
        self._response = response
        self._slot = slot

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self._response.status

    @property
    def reason(self) -> str | None:
        """The reason phrase."""
        return self._response.reason

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        """The response headers."""
        return self._response.headers

    @property
    def upstream_seconds(self) -> float | None:
        """Time to the response's head."""
        return self._response.upstream_seconds

    def read_buffered(self) -> bytes:
        """The body bytes that came with the head."""
        return self._response.read_buffered()

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body as it arrives."""
        return self._response.iter_chunks()

    def body_complete(self) -> bool:
        """Whether read_buffered took the whole body."""
        return self._response.body_complete()

    def close(self) -> None:
        """Close the response, then give its slot back."""
        try:
            self._response.close()
        finally:
            self._slot.release()


class ClientLimit:
    """At most `limit` requests in flight per client (0: no limit), answered 429 past it.

    A client is an untrusted peer's address, or the caller a trusted gateway names in
    `X-Real-Ip`. A trusted peer that names no caller is the gateway (or this host) carrying
    everyone's requests: limiting it would limit them all, so only the upstream's pools bound it.
    """

    def __init__(
        self, limit: int, identity: IdentityResolver, stats: CacheStats | None = None
    ) -> None:
        self._limit = limit
        self._identity = identity
        self._stats = stats
        self._in_flight: dict[str, int] = {}  # only clients with requests in flight: bounded

    def guard(self, handler: Handler) -> Handler:
        """`handler`, with each client's requests in flight counted and capped."""
        if self._limit <= 0:
            return handler

        @functools.wraps(handler)
        async def limited(request: web.Request) -> web.StreamResponse:
            client = self.client(request)
            if client is None:
                return await handler(request)
            count = self._in_flight.get(client, 0)
            if count >= self._limit:
                if self._stats is not None:
                    self._stats.errors["client_limit"] += 1
                detail = f"too many requests in flight from this client (at most {self._limit})"
                # RFC 6585 4: 429 says the client, not the server, is asking too much.
                return await refuse(request, 429, detail, {"Retry-After": CLIENT_RETRY_AFTER})
            self._in_flight[client] = count + 1
            try:
                return await handler(request)
            finally:
                left = self._in_flight[client] - 1
                if left:
                    self._in_flight[client] = left
                else:
                    del self._in_flight[client]

        return limited

    def client(self, request: web.BaseRequest) -> str | None:
        """The client `request` is counted against; None when it is not limited."""
        if not self._identity.trusted_peer(request):
            return request.remote or ""
        return self._identity.named_client(request, trusted=True)  # None: the gateway itself
