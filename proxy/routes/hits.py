"""A hit's answer: a memory entry replayed with prebuilt headers, a Volume stream as it is read."""

from __future__ import annotations

import logging
import time
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.headers import age_of, for_origin, hit_headers, origin_bound
from proxy.request_context import REQUEST_ID_HEADER, client_or_new_id, stamp_request_id
from proxy.routes.responses import abort_connection
from proxy.speak import CacheKey
from proxy.storage.entry import Entry, EntryMeta
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import CorruptEntry, EntryStream

log = logging.getLogger("proxy.routes.speak")

# Prebuilt hit headers kept at once (per entry and tier); past it they are built again.
REPLAY_HEADER_CACHE: Final = 2_048


class PrebuiltHeaders:
    """A hit's headers, built once per entry and tier; only Age is rewritten, once a second.

    Keyed by the entry's metadata, not the entry: holding bodies here would keep entries the
    memory tier has evicted alive, past its byte bound.
    """

    __slots__ = ("age", "headers", "meta", "origin_bound")

    def __init__(self, meta: EntryMeta, headers: CIMultiDict[str]) -> None:
        self.meta = meta
        self.headers = headers
        self.age: int | None = None
        # A CORS answer for one origin is replayed per request, only to that origin.
        self.origin_bound = origin_bound(headers)


class HitReplay:
    """Stored responses replayed, their headers built once per entry and tier."""

    __slots__ = ("_prebuilt",)

    def __init__(self) -> None:
        self._prebuilt: dict[tuple[CacheKey, str], PrebuiltHeaders] = {}

    def replay(self, request: web.Request, key: CacheKey, entry: Entry, tier: str) -> web.Response:
        """The stored response; its headers are built once per entry and tier, then reused."""
        meta = entry.meta
        prebuilt = self._prebuilt.get((key, tier))
        if prebuilt is None or prebuilt.meta is not meta:
            prebuilt = PrebuiltHeaders(meta, hit_headers(key, meta, tier))
            if len(self._prebuilt) >= REPLAY_HEADER_CACHE:
                self._prebuilt.clear()
            self._prebuilt[(key, tier)] = prebuilt
        age = int(time.time() - meta.created_at)
        if age != prebuilt.age:  # Age changes once a second: so do the prebuilt headers
            prebuilt.age = age
            prebuilt.headers[hdrs.AGE] = str(max(0, age))
        headers = prebuilt.headers
        if prebuilt.origin_bound:
            headers = for_origin(headers, request.headers.get(hdrs.ORIGIN))
        response = web.Response(status=meta.status, body=entry.body, headers=headers)
        # Nothing went upstream, so no one else needs this id: a new one, not kept on the request.
        response.headers.add(REQUEST_ID_HEADER, client_or_new_id(request))
        return response


async def send_stream(
    request: web.Request, key: CacheKey, stream: EntryStream, cache: TieredCache, mark: int
) -> web.StreamResponse:
    """A Volume hit sent as it is read; copied into memory once it ended intact, unless a
    purge covered the key since the lookup began (`mark`)."""
    meta = stream.meta
    headers = hit_headers(key, meta, "volume")
    headers[hdrs.AGE] = age_of(meta)
    if origin_bound(headers):
        headers = for_origin(headers, request.headers.get(hdrs.ORIGIN))
    response = web.StreamResponse(status=meta.status, headers=headers)
    response.content_length = meta.length
    stamp_request_id(request, response)
    parts: list[bytes] = []
    try:
        await response.prepare(request)
        async for chunk in stream:
            parts.append(chunk)
            await response.write(chunk)
    except ConnectionError:
        return response  # the client left; nothing wrong with the entry
    except CorruptEntry:
        abort_connection(request)  # counted and removed by the Volume
        return response
    except Exception as exc:
        cache.count_error("volume", "stream", key, exc)
        abort_connection(request)
        return response
    finally:
        await stream.aclose()
    await response.write_eof()
    cache.promote(key, Entry(meta, b"".join(parts)), since=mark)
    log.debug("hit %s streamed from the volume", key.digest())
    return response
