"""The legacy backend over HTTP: the shared client session, forwarded headers, speak misses."""

from __future__ import annotations

import logging
import time
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.headers import VIA, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO
from proxy.request_context import (
    REQUEST_ID_HEADER,
    request_id,
)
from proxy.stats import CacheStats
from proxy.upstreams.base import SpeakCall, UpstreamError
from proxy.upstreams.client_stream import ClientStream, as_upstream_error
from proxy.upstreams.connection import UpstreamConnector

log = logging.getLogger(__name__)
# An unreachable backend is one warning this often, with the count of calls it failed meanwhile.
UNREACHABLE_WARNING_SECONDS: Final = 60.0

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# aiohttp's client would otherwise add these; a transparent proxy sends only what the client sent.
SKIP_AUTO_HEADERS: Final = ("User-Agent", "Accept-Encoding", "Accept", "Content-Type")
Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def end_to_end(headers: Headers) -> CIMultiDict[str]:
    """`headers` without hop-by-hop ones (RFC 9110 7.6.1), repeated headers kept."""
    named = {
        token.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, [])
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def outgoing_headers(request: web.BaseRequest, headers: Headers) -> CIMultiDict[str]:
    """What the backend is sent for `request`: its end-to-end headers, X-Forwarded-*, Via (RFC
    9110 7.6.3) and X-Request-Id."""
    out = end_to_end(headers)
    out.popall(hdrs.HOST, None)
    peer = request.remote or ""
    previous = ", ".join(out.getall(X_FORWARDED_FOR, []))
    out.popall(X_FORWARDED_FOR, None)
    out[X_FORWARDED_FOR] = f"{previous}, {peer}" if previous else peer
    out.setdefault(X_FORWARDED_PROTO, request.scheme)
    if request.host:
        out.setdefault(X_FORWARDED_HOST, request.host)
    out.add(hdrs.VIA, VIA)
    out[REQUEST_ID_HEADER] = request_id(request)
    return out


def client_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """The shared upstream session: no cookie jar, no decompression, no redirects followed;
    interim responses handed on and excess bytes discarded (`UpstreamConnector`)."""
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.connect_timeout_seconds,
        sock_read=settings.timeout_seconds,
    )
    connector = UpstreamConnector(
        limit=settings.max_connections,
        enable_cleanup_closed=True,
        # Idle connections are reused only while the backend surely keeps them (uvicorn closes
        # them after 5 s idle): a POST written as the server closes one is lost, as a client
        # retries only idempotent requests on a stale connection (RFC 9112 9.3.1).
        keepalive_timeout=4.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        # A shared jar would replay one user's cookies on another user's requests.
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,
        trust_env=False,
    )


class HttpUpstream:
    """The legacy backend: its URLs, the time it takes to answer, and speak misses."""

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        *,
        stats: CacheStats | None = None,
    ) -> None:
        self._base = URL(settings.url.rstrip("/"))
        self._base_path = self._base.raw_path.rstrip("/")
        self._session = session
        self._stats = stats
        self._unreachable = 0
        self._next_warning = 0.0

    def url_for(self, raw_path: str) -> URL:
        """The upstream URL for a client's raw path and query, unchanged."""
        return URL(str(self._base.origin()) + self._base_path + raw_path, encoded=True)

    async def open(self, call: SpeakCall) -> ClientStream:
        """POST a speak miss to the backend and return its streamed response."""
        started = time.monotonic()
        try:
            response = await self._session.post(
                self.url_for(call.raw_path),
                headers=call.headers,
                data=call.body,
                allow_redirects=False,
            )
        except Exception as exc:
            seconds = self.timed(started, failed=True)
            error = self.failed(exc)
            raise UpstreamError(error.status, error.detail, upstream_seconds=seconds) from exc
        seconds = self.timed(started, failed=response.status >= 500)
        return ClientStream(response, upstream_seconds=seconds)

    def failed(self, exc: BaseException) -> UpstreamError:
        """The answer for a call that got no response; an unreachable backend is also logged.

        Refused or unroutable connections are the operator's problem, not the client's: one
        warning a minute names the URL, so a dead backend is not just 502s in the access log.
        """
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            self._unreachable += 1
            now = time.monotonic()
            if now >= self._next_warning:
                self._next_warning = now + UNREACHABLE_WARNING_SECONDS
                log.warning(
                    "upstream %s unreachable: %s (%d calls failed since the last warning)",
                    self._base.with_user(None),
                    exc,
                    self._unreachable,
                )
                self._unreachable = 0
        return as_upstream_error(exc)

    def timed(self, started: float, *, failed: bool) -> float:
        """Time to the upstream's headers, counted in the stats and returned."""
        seconds = time.monotonic() - started
        stats = self._stats
        if stats is not None:
            stats.upstream_seconds.observe(seconds)
            if failed:
                stats.errors["upstream"] += 1
        return seconds
