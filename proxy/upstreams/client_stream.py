"""aiohttp's client seen through the Upstream contract: its responses, and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDictProxy

from proxy.upstreams.base import UpstreamError

# Statuses whose response never has a body, whatever its headers say (RFC 9112 6.3, rule 1).
NO_BODY_STATUSES = frozenset({204, 304})


def as_upstream_error(exc: BaseException) -> UpstreamError:
    """Map a client-side exception to the answer the client should get."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError(502, "upstream unavailable (ConnectionTimeoutError)")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamError(504, "upstream timed out")
    reason = type(exc).__name__
    return UpstreamError(502, f"upstream unavailable ({reason})")


class ClientStream:
    """An aiohttp client response as an UpstreamResponse."""

    def __init__(self, response: aiohttp.ClientResponse, *, upstream_seconds: float) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason
        self.headers: CIMultiDictProxy[str] = response.headers
        self.upstream_seconds: float | None = upstream_seconds
        self._until_close = reads_until_close(response.status, response.headers)
        self._closing = _closing(response) if self._until_close else None

    def read_buffered(self) -> bytes:
        """The body bytes that arrived with the head, without waiting (may be empty)."""
        try:
            return self._response.content.read_nowait()
        except aiohttp.ClientError:
            return b""  # the stream failed: iter_chunks raises it, where it is handled

    def body_complete(self) -> bool:
        """True when the parser has seen the body's end (its length, or its last chunk) and
        read_buffered took everything; a body read until the close is never complete here."""
        content = self._response.content
        return not self._until_close and content.is_eof() and not content.exception()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError when it is cut short."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except Exception as exc:
            raise as_upstream_error(exc) from exc
        if self._until_close and not _closed_cleanly(self._closing):
            # A body delimited by the close is complete only when the connection reported no
            # error as it closed (RFC 9112 8): a reset cut it. aiohttp ends it at any close.
            raise UpstreamError(502, "upstream reset the connection mid-body")

    def close(self) -> None:
        """Release the connection (closed unless its response was read to the end)."""
        self._response.release()


def reads_until_close(status: int, headers: CIMultiDictProxy[str]) -> bool:
    """True when a response's body is delimited by the connection's close (RFC 9112 6.3):
    neither a final chunked coding (rule 4) nor a Content-Length (rule 6) frames it."""
    if status in NO_BODY_STATUSES or 100 <= status < 200:
        return False
    coding = headers.get(hdrs.TRANSFER_ENCODING)
    if coding is not None:
        return coding.rsplit(",", 1)[-1].strip().lower() != "chunked"
    return hdrs.CONTENT_LENGTH not in headers


def _closing(response: aiohttp.ClientResponse) -> asyncio.Future[None] | None:
    """The connection's close, failed when it was not orderly; None when it closed already."""
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    closing = protocol.closed if protocol is not None else None
    if closing is not None:
        # Retrieved here too, so a fill that stops reading early leaves no error unretrieved.
        closing.add_done_callback(_retrieve)
    return closing


def _retrieve(closing: asyncio.Future[None]) -> None:
    if not closing.cancelled():
        closing.exception()


def _closed_cleanly(closing: asyncio.Future[None] | None) -> bool:
    """An unknown close counts as a reset: a body whose end cannot be vouched for is not whole."""
    if closing is None or not closing.done() or closing.cancelled():
        return False
    return closing.exception() is None
