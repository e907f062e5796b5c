"""The legacy backend over HTTP: the transparent pass-through, and speak misses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Final

import aiohttp
from aiohttp import WSMsgType, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.headers import VIA, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO
from proxy.request_context import (
    REQUEST_ID_HEADER,
    UPSTREAM_SECONDS,
    request_id,
    stamp_request_id,
)
from proxy.stats import CacheStats
from proxy.upstreams.base import SpeakCall, UpstreamError
from proxy.upstreams.client_stream import ClientStream, as_upstream_error

log = logging.getLogger(__name__)

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
WS_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)

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


def json_error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error in the shape the legacy Flutter client reads: {"detail": "..."}."""
    return web.json_response({"detail": detail}, status=status, headers=headers)


def client_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """The shared upstream session: no cookie jar, no decompression, no redirects followed."""
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.connect_timeout_seconds,
        sock_read=settings.timeout_seconds,
    )
    connector = aiohttp.TCPConnector(
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
    """The legacy backend: forwards anything, and opens speak misses."""

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

    def url_for(self, raw_path: str) -> URL:
        """The upstream URL for a client's raw path and query, unchanged."""
        return URL(str(self._base.origin()) + self._base_path + raw_path, encoded=True)

    async def forward(
        self,
        request: web.Request,
        headers: Headers,
        body: bytes | None = None,
        *,
        extra_headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Pass `request` upstream and its response back, streamed both ways."""
        if body is None and _is_websocket(request):
            return await self._forward_websocket(request, headers)
        outgoing = outgoing_headers(request, headers)
        data: bytes | AsyncIterator[bytes] | None
        if body is not None:
            data = body
            outgoing.popall(hdrs.CONTENT_LENGTH, None)
        elif request.body_exists:
            data = _stream_body(request)
        else:
            data = None
        started = time.monotonic()
        try:
            upstream = await self._session.request(
                request.method,
                self.url_for(request.raw_path),
                headers=outgoing,
                data=data,
                allow_redirects=False,
            )
        except Exception as exc:
            request[UPSTREAM_SECONDS] = self._timed(started, failed=True)
            error = as_upstream_error(exc)
            return json_error(error.status, error.detail, headers=extra_headers)
        request[UPSTREAM_SECONDS] = self._timed(started, failed=upstream.status >= 500)
        try:
            return await relay(request, upstream, extra_headers)
        finally:
            upstream.release()

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
            seconds = self._timed(started, failed=True)
            error = as_upstream_error(exc)
            raise UpstreamError(error.status, error.detail, upstream_seconds=seconds) from exc
        seconds = self._timed(started, failed=response.status >= 500)
        return ClientStream(response, upstream_seconds=seconds)

    def _timed(self, started: float, *, failed: bool) -> float:
        """Time to the upstream's headers, counted in the stats and returned."""
        seconds = time.monotonic() - started
        stats = self._stats
        if stats is not None:
            stats.upstream_seconds.observe(seconds)
            if failed:
                stats.errors["upstream"] += 1
        return seconds

    async def _forward_websocket(
        self, request: web.Request, headers: Headers
    ) -> web.StreamResponse:
        outgoing = outgoing_headers(request, headers)
        for name in list(outgoing):
            if name.lower() in WS_HANDSHAKE:
                outgoing.popall(name, None)
        protocols = [
            p.strip()
            for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, [])
            for p in value.split(",")
            if p.strip()
        ]
        try:
            upstream_ws = await self._session.ws_connect(
                self.url_for(request.raw_path),
                headers=outgoing,
                protocols=protocols,
                autoclose=False,
                autoping=True,
                max_msg_size=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return json_error(502, f"upstream refused the WebSocket upgrade: {exc.status}")
        except Exception as exc:
            error = as_upstream_error(exc)
            return json_error(error.status, error.detail)
        client_ws = web.WebSocketResponse(
            protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
            autoclose=False,
            max_msg_size=0,
        )
        stamp_request_id(request, client_ws)
        await client_ws.prepare(request)
        async with upstream_ws:
            await _pump_websockets(client_ws, upstream_ws)
        return client_ws


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Copy an upstream response to the client as it arrives."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(end_to_end(upstream.headers))
    response.headers.add(hdrs.VIA, VIA)
    if extra_headers:
        response.headers.update(extra_headers)
    if upstream.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked":
        response.enable_chunked_encoding()
    stamp_request_id(request, response)
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        # Headers are gone already: cutting the connection is the only honest signal left.
        log.warning("upstream body broke mid-stream: %s", type(exc).__name__)
        abort_connection(request)
        return response
    await response.write_eof()
    return response


def abort_connection(request: web.BaseRequest) -> None:
    """Close the client connection so a truncated body cannot pass for a complete one."""
    if request.transport is not None:
        request.transport.abort()


async def _stream_body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        yield chunk


def _is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get(hdrs.UPGRADE, "").lower()
    connection = request.headers.get(hdrs.CONNECTION, "").lower()
    return upgrade == "websocket" and "upgrade" in connection and request.method == "GET"


async def _pump_websockets(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    async def client_to_upstream() -> None:
        async for message in client:
            if message.type is WSMsgType.TEXT:
                await upstream.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await upstream.send_bytes(message.data)
        await upstream.close(code=client.close_code or 1000)

    async def upstream_to_client() -> None:
        async for message in upstream:
            if message.type is WSMsgType.TEXT:
                await client.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await client.send_bytes(message.data)
            elif message.type is WSMsgType.CLOSE:
                break
        await client.close(code=upstream.close_code or 1000, message=_close_reason(upstream))

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # Let the other side finish its close handshake briefly, then stop it.
        if pending:
            await asyncio.wait(pending, timeout=5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _close_reason(ws: aiohttp.ClientWebSocketResponse) -> bytes:
    exc = ws.exception()
    return b"" if exc is None else b"upstream error"
