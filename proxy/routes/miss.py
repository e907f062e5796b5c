"""A miss's answer: one client's view of a fill, sent chunk by chunk from the first."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import hdrs, web

from proxy.fill import Fill, FillBroken, FillReader
from proxy.headers import (
    VIA,
    cache_headers,
    for_origin,
    make_private,
    miss_status,
    origin_bound,
    replay_only,
)
from proxy.request_context import UPSTREAM_SECONDS, stamp_request_id
from proxy.routes.responses import abort_connection, json_error
from proxy.speak import CacheKey
from proxy.upstreams.http import end_to_end


async def stream_fill(
    request: web.Request,
    fill: Fill,
    reader: FillReader,
    key: CacheKey,
    *,
    collapsed: bool,
    replayed: Callable[[], bool] | None = None,
) -> web.StreamResponse:
    """Send one client the fill's response through its reader, chunk by chunk, from the first.

    `replayed()`, once the head is in, says whether the fill replays another process's (the
    key's owner among the workers, another replica): its clients are then joined clients too.
    """
    try:
        await fill.wait_ready()
        if replayed is not None and replayed():
            collapsed = True
        if not collapsed and fill.upstream_seconds is not None:
            # For the access log: the upstream was waited for by the fill's first request only.
            request[UPSTREAM_SECONDS] = fill.upstream_seconds
        stored = fill.storable and fill.store_allowed
        ours = cache_headers(key, "miss", miss_status(collapsed=collapsed, stored=stored))
        if not stored or fill.error is not None:
            del ours[hdrs.CONTENT_LOCATION]  # names only audio the cache will hold
        if fill.error is not None:
            failed = {**ours, **fill.error.headers, hdrs.CACHE_CONTROL: "private"}
            return json_error(fill.error.status, fill.error.detail, headers=failed)
        response = web.StreamResponse(status=fill.status, reason=fill.reason)
        if collapsed:
            # A joined client gets what a hit would replay, never the first client's exchange
            # (its Set-Cookie), and CORS headers only for the origin they were made for.
            headers = replay_only(fill.headers)
            if origin_bound(headers):
                headers = for_origin(headers, request.headers.get(hdrs.ORIGIN))
            length = fill.headers.get(hdrs.CONTENT_LENGTH)
            if length is not None and length.isdigit():
                response.content_length = int(length)
        else:
            headers = end_to_end(fill.headers)
        response.headers.extend(headers)
        response.headers.add(hdrs.VIA, VIA)
        response.headers.update(ours)
        make_private(response.headers)
        if hdrs.CONTENT_LENGTH not in fill.headers:
            response.enable_chunked_encoding()
        stamp_request_id(request, response)
        await response.prepare(request)
        try:
            async for chunk in reader:
                await response.write(chunk)
        except FillBroken:
            abort_connection(request)
            return response
        await response.write_eof()
        return response
    finally:
        reader.close()
