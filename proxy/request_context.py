"""Per-request facts for handlers, the upstream and the access log: the id, the upstream time."""

from __future__ import annotations

import re
import uuid
from typing import Final

from aiohttp import web

REQUEST_ID_HEADER: Final = "X-Request-Id"
REQUEST_ID: Final = web.RequestKey("request_id", str)
UPSTREAM_SECONDS: Final = web.RequestKey("upstream_seconds", float)

# A client's id is passed through only when it looks like an id: no spaces, no text, bounded.
_SANE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def request_id(request: web.BaseRequest) -> str:
    """The request's id: the client's X-Request-Id when it is sane, else a new one; stable."""
    if REQUEST_ID in request:
        return request[REQUEST_ID]
    given = request.headers.get(REQUEST_ID_HEADER, "")
    chosen = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = chosen
    return chosen


async def send_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: every response names its request id."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)
