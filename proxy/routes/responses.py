"""The responses every route shares: the JSON error the legacy client reads, and the cut-off."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def json_error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error in the shape the legacy Flutter client reads: {"detail": "..."}."""
    return web.json_response({"detail": detail}, status=status, headers=headers)


def abort_connection(request: web.BaseRequest) -> None:
    """Close the client connection so a truncated body cannot pass for a complete one."""
    if request.transport is not None:
        request.transport.abort()
