"""The audio URL: a cached entry served to its owner with Range, ETag and HEAD."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import hdrs, web

from proxy.headers import X_TTS_CACHE, for_origin, meta_headers, origin_bound
from proxy.identity import CURRENT_TOKEN, Identity, IdentityResolver
from proxy.ownership import OwnershipCheck
from proxy.ranges import Unsatisfiable, etag_matches, parse_range
from proxy.request_context import CACHE_KEY
from proxy.routes.responses import json_error
from proxy.speak import SHARED_USER, CacheKey
from proxy.storage.entry import Entry
from proxy.storage.tiered import TieredCache

AUDIO_ROUTE = "/_proxy/audio/{thread}/{message}/{voice}"


@dataclass(frozen=True)
class AudioUrl:
    """GET/HEAD of `/_proxy/audio/{thread}/{message}/{voice}` for the user who owns it.

    A content key's entry is `/_proxy/audio/_text/{digest}/{variant}` (the requester's own) or
    `/_proxy/audio/_shared/{digest}/{variant}` (the shared scope: any identified caller). The
    requester is identified as `identity.mode` says, then as each speak route's own mode says
    (`modes`): an entry made through an API-key route is fetched with the same bearer key.
    """

    identity: IdentityResolver
    cache: TieredCache
    ownership: OwnershipCheck | None = None
    modes: tuple[str, ...] = ()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve the entry, a range of it, or 304/404/416."""
        info = request.match_info
        thread, message, voice = info["thread"], info["message"], info["voice"]
        for identity in self._identities(request):
            if thread == SHARED_USER:
                key = CacheKey.content(SHARED_USER, message, voice)
            else:
                key = CacheKey(identity.user, thread, message, voice)
            if not key.valid():
                break
            request[CACHE_KEY] = key
            ownership = self.ownership
            if ownership is not None and not key.is_content and not await ownership.allows(key):
                continue
            CURRENT_TOKEN.set(identity.token)
            found = await self.cache.get(key)
            if found is not None:
                entry, tier = found
                return serve_entry(request, entry, tier)
        return json_error(404, "no such audio")

    def _identities(self, request: web.Request) -> Iterator[Identity]:
        """Who the requester is, in each identity mode in use (each user once)."""
        seen: set[str] = set()
        for mode in (None, *self.modes):
            identity = self.identity.identify(request, mode=mode)
            if isinstance(identity, Identity) and identity.user not in seen:
                seen.add(identity.user)
                yield identity


def serve_entry(request: web.BaseRequest, entry: Entry, tier: str) -> web.Response:
    """A cached entry as a GET/HEAD answer: 200, 206 for a Range, 304 on a matching ETag, 416."""
    headers = meta_headers(entry.meta, tier)
    if origin_bound(headers):
        headers = for_origin(headers, request.headers.get(hdrs.ORIGIN))
    headers[hdrs.ACCEPT_RANGES] = "bytes"
    headers[X_TTS_CACHE] = "hit"
    # Responses vary by who asks: shared caches must not reuse them across users.
    headers[hdrs.CACHE_CONTROL] = "private, no-cache"
    if etag_matches(request.headers.get(hdrs.IF_NONE_MATCH), entry.meta.etag):
        for name in (hdrs.CONTENT_TYPE, "Content-Language"):
            headers.popall(name, None)
        return web.Response(status=304, headers=headers)
    range_header = request.headers.get(hdrs.RANGE)
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is not None and if_range.strip() != entry.meta.etag:
        range_header = None
    try:
        wanted = parse_range(range_header, entry.meta.length)
    except Unsatisfiable:
        headers[hdrs.CONTENT_RANGE] = f"bytes */{entry.meta.length}"
        return web.Response(status=416, headers=headers)
    if wanted is None:
        return web.Response(body=entry.body, headers=headers)
    headers[hdrs.CONTENT_RANGE] = wanted.content_range()
    body = entry.body[wanted.first : wanted.last + 1]
    return web.Response(status=206, body=body, headers=headers)
