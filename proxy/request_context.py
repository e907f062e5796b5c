"""Per-request facts for handlers, the upstream and the access log: the id, the upstream time."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from proxy.headers import X_REQUEST_ID
from proxy.speak import CacheKey

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# An istr: looked up in the request headers and set in the response headers on every hit.
REQUEST_ID_HEADER: Final = X_REQUEST_ID
REQUEST_ID: Final = web.RequestKey("request_id", str)
UPSTREAM_SECONDS: Final = web.RequestKey("upstream_seconds", float)
# The key of the entry a response concerns (speak calls, audio URLs), for the access log's hash.
CACHE_KEY: Final = web.RequestKey("cache_key", CacheKey)

# A client's id is passed through only when it looks like an id: no spaces, no text, bounded.
_SANE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# New ids: a random prefix per process and a counter. Unique across processes and restarts
# without a system call per request, as a uuid4 would cost.
_prefix = os.urandom(6).hex()
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(6).hex()
    _counter = itertools.count(1)


# `serve --workers` forks: each worker needs a prefix of its own.
os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """A fresh request id, unique across processes."""
    return f"{_prefix}-{next(_counter):x}"


def request_id(request: web.BaseRequest) -> str:
    """The request's id: the client's X-Request-Id when it is sane, else a new one; stable."""
    if REQUEST_ID in request:
        return request[REQUEST_ID]
    given = request.headers.get(REQUEST_ID_HEADER, "")
    chosen = given if given and _SANE_ID.fullmatch(given) else new_request_id()
    request[REQUEST_ID] = chosen
    return chosen


def client_or_new_id(request: web.BaseRequest) -> str:
    """The client's sane X-Request-Id, or a new id; for responses nothing else needs the id of."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if given and _SANE_ID.fullmatch(given) else new_request_id()


def stamp_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Name the request's id on `response`, unless it does already; before it is prepared."""
    if REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request_id(request)


def with_request_id(handler: Handler) -> Handler:
    """`handler`, every response of which names the request id (see docs/architecture.md).

    Responses the handler returns, and HTTP errors it raises, are stamped here; a handler that
    prepares a streamed response itself stamps it before (stamp_request_id). An unexpected error
    becomes a logged 500 {"detail"} with the id, where nothing was sent yet. No
    on_response_prepare signal: awaiting one per response is a measurable share of a hit
    (bench/README.md).
    """

    @functools.wraps(handler)
    async def stamped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            stamp_request_id(request, exc)
            raise
        except Exception:
            return internal_error(request)
        if not response.prepared:
            stamp_request_id(request, response)
        return response

    return stamped


def internal_error(request: web.Request) -> web.Response:
    """In an `except` block: the error logged with the request id, and a 500 {"detail"} naming
    it; re-raised when the response has begun (aiohttp then ends the connection)."""
    if request.writer.output_size > 0:
        raise  # the exception being handled: this is always called in an except block
    rid = request_id(request)
    log.exception("unexpected error serving %s %s [%s]", request.method, request.path, rid)
    response = web.json_response({"detail": "internal error"}, status=500)
    response.headers[REQUEST_ID_HEADER] = rid
    return response
