"""Request bodies within bounds: a size, a silence between reads, a speak body's whole time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.routes.responses import answer_and_close, json_error


class BodyTooLarge(Exception):
    """The request body is over tts.max_body_bytes."""


class BodyTimedOut(Exception):
    """The request body went silent for too long, or took too long as a whole."""


async def read_request_body(
    request: web.BaseRequest, limit: int, *, idle_seconds: float, total_seconds: float
) -> bytes:
    """The whole request body; BodyTooLarge as soon as it passes `limit`, BodyTimedOut when
    nothing arrives for `idle_seconds` or the whole takes over `total_seconds`."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge()
    content = request.content
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(total_seconds):
            while True:
                async with asyncio.timeout(idle_seconds):
                    chunk = await content.readany()
                if not chunk:  # the end, read: aiohttp has nothing left to drain afterwards
                    return b"".join(parts)
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge()
                parts.append(chunk)
    except TimeoutError:
        raise BodyTimedOut() from None


class StreamedBody:
    """A request body passed on as it arrives; a silence of `idle_seconds` ends it.

    aiohttp's client reads `chunks()` in a task of its own and reports a failure as a lost
    connection: `timed_out` tells the caller the client, not the upstream, failed.
    """

    __slots__ = ("_idle", "_request", "timed_out")

    def __init__(self, request: web.BaseRequest, idle_seconds: float) -> None:
        self._request = request
        self._idle = idle_seconds
        self.timed_out = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks until its end; BodyTimedOut after a silence."""
        content = self._request.content
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await content.readany()
            except TimeoutError:
                self.timed_out = True
                raise BodyTimedOut() from None
            if not chunk:
                return
            yield chunk


async def body_timed_out(request: web.BaseRequest) -> web.StreamResponse:
    """408 {"detail"} and the connection closed: the server gave up waiting for the request, and
    the connection's framing is unknown past what was read (RFC 9110 15.5.9)."""
    response = json_error(408, "the request body stopped arriving; send it again")
    return await answer_and_close(request, response)
