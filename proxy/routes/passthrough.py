"""The pass-through: every request the cache does not answer, to the backend and back untouched.

HTTP in both directions as it arrives (server-sent events included), and WebSocket upgrades.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import suppress
from typing import Final

import aiohttp
from aiohttp import HttpVersion11, WSMsgType, hdrs, web
from aiohttp.http import RawResponseMessage

from proxy.headers import VIA
from proxy.request_context import UPSTREAM_SECONDS, stamp_request_id
from proxy.routes.responses import abort_connection, json_error
from proxy.upstreams.client_stream import as_upstream_error
from proxy.upstreams.connection import InterimResponsesTo
from proxy.upstreams.http import Headers, HttpUpstream, end_to_end, outgoing_headers

log = logging.getLogger(__name__)

# What would end a field or a head early: never written into an interim response.
LINE_BREAK: Final = re.compile("[\r\n\0]")
WS_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


class Passthrough:
    """Forwards a request to the legacy backend and streams its answer back."""

    def __init__(self, upstream: HttpUpstream, session: aiohttp.ClientSession) -> None:
        self._upstream = upstream
        self._session = session

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
            with InterimResponsesTo(functools.partial(forward_interim, request)):
                upstream = await self._session.request(
                    request.method,
                    self._upstream.url_for(request.raw_path),
                    headers=outgoing,
                    data=data,
                    allow_redirects=False,
                )
        except Exception as exc:
            request[UPSTREAM_SECONDS] = self._upstream.timed(started, failed=True)
            error = as_upstream_error(exc)
            return json_error(error.status, error.detail, headers=extra_headers)
        request[UPSTREAM_SECONDS] = self._upstream.timed(started, failed=upstream.status >= 500)
        try:
            return await relay(request, upstream, extra_headers)
        finally:
            upstream.release()

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
                self._upstream.url_for(request.raw_path),
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


async def forward_interim(request: web.Request, message: RawResponseMessage) -> None:
    """Send an upstream interim (1xx) response on to the client, ahead of the final one.

    A proxy MUST forward 1xx responses, except those it asked for itself, and never to an
    HTTP/1.0 client, which knows none (RFC 9110 15.2). A 100 (Continue) answers the proxy's own
    request: aiohttp's server answered the client's expectation before the handler ran.
    """
    if message.code == 100 or request.version < HttpVersion11:
        return
    fields = end_to_end(message.headers)
    fields.add(hdrs.VIA, VIA)
    parts = [message.reason, *fields.keys(), *fields.values()]
    if any(LINE_BREAK.search(part) for part in parts):
        log.warning("upstream interim response not forwarded: a field holds a line break")
        return
    lines = [f"HTTP/1.1 {message.code} {message.reason}"]
    lines.extend(f"{name}: {value}" for name, value in fields.items())
    head = "\r\n".join(lines) + "\r\n\r\n"
    with suppress(ConnectionError):  # the client left: its final response fails as well
        # aiohttp's server has no API for interim responses; it writes its own 100 (Continue)
        # on the request's writer before the response is prepared, as this does.
        await request.writer.write(head.encode("utf-8", "surrogateescape"))
    request.writer.output_size = 0  # the response proper has not begun


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
