"""Per-request facts for handlers, the upstream and the access log: the id, the upstream time."""

from __future__ import annotations

import itertools
import os
import re
from typing import Final

from aiohttp import web
from multidict import istr

# An istr: looked up in the request headers and set in the response headers on every hit.
REQUEST_ID_HEADER: Final = istr("X-Request-Id")
REQUEST_ID: Final = web.RequestKey("request_id", str)
UPSTREAM_SECONDS: Final = web.RequestKey("upstream_seconds", float)

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


async def send_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: every response names its request id."""
    if REQUEST_ID_HEADER not in response.headers:  # a hit sets it itself, more cheaply
        response.headers[REQUEST_ID_HEADER] = request_id(request)
