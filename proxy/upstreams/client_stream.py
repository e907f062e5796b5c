"""aiohttp's client seen through the Upstream contract: its responses, and its errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDictProxy

from proxy.upstreams.base import UpstreamError


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

    def read_buffered(self) -> bytes:
        """The body bytes that arrived with the head, without waiting (may be empty)."""
        try:
            return self._response.content.read_nowait()
        except aiohttp.ClientError:
            return b""  # the stream failed: iter_chunks raises it, where it is handled

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError when it is cut short."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except Exception as exc:
            raise as_upstream_error(exc) from exc

    def close(self) -> None:
        """Release the connection (closed unless its response was read to the end)."""
        self._response.release()
