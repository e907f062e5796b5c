"""The responses every route shares: the JSON error the legacy client reads, and the cut-off."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress

from aiohttp import web

from proxy.request_context import stamp_request_id


def json_error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error in the shape the legacy Flutter client reads: {"detail": "..."}."""
    return web.json_response({"detail": detail}, status=status, headers=headers)


def abort_connection(request: web.BaseRequest) -> None:
    """Close the client connection so a truncated body cannot pass for a complete one."""
    if request.transport is not None:
        request.transport.abort()


async def refuse(
    request: web.BaseRequest,
    status: int,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """A JSON error for a request the proxy will not serve; while its body is unread, the
    connection is closed after the answer (see answer_and_close)."""
    response = json_error(status, detail, headers)
    if request.body_exists and not request.content.is_eof():
        await answer_and_close(request, response)
    return response


async def answer_and_close(
    request: web.BaseRequest, response: web.StreamResponse
) -> web.StreamResponse:
    """Send `response` with `Connection: close`, then close the connection at once.

    The rest of the request's body is never read: aiohttp would otherwise read and discard it
    for up to 10 s (its lingering time) before closing, which is what a slow client wants.
    """
    response.force_close()
    stamp_request_id(request, response)
    with suppress(ConnectionError):  # the client left already: there is nothing to close
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()
    return response
