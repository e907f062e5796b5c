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
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import HttpVersion11, WSMsgType, hdrs, web
from aiohttp.http import RawResponseMessage

from proxy.headers import VIA
from proxy.limits import Slot, UpstreamBusy, UpstreamSlots
from proxy.request_context import UPSTREAM_SECONDS, stamp_request_id
from proxy.routes.bodies import StreamedBody, body_timed_out
from proxy.routes.responses import abort_connection, json_error
from proxy.settings import Settings
from proxy.stats import CacheStats
from proxy.upstreams.connection import InterimResponsesTo
from proxy.upstreams.http import Headers, HttpUpstream, end_to_end, outgoing_headers

log = logging.getLogger(__name__)

EVENT_STREAM: Final = "text/event-stream"
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


@dataclass(frozen=True)
class PassthroughLimits:
    """What bounds a forwarded request: upstream slots, a body's silence, a WebSocket message."""

    slots: UpstreamSlots
    body_idle_seconds: float
    websocket_max_message_bytes: int
    stats: CacheStats | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, slots: UpstreamSlots, stats: CacheStats | None = None
    ) -> PassthroughLimits:
        """The limits the settings name."""
        return cls(
            slots=slots,
            body_idle_seconds=settings.server.body_idle_timeout_seconds,
            websocket_max_message_bytes=settings.upstream.websocket_max_message_bytes,
            stats=stats,
        )


class Passthrough:
    """Forwards a request to the legacy backend and streams its answer back."""

    def __init__(
        self, upstream: HttpUpstream, session: aiohttp.ClientSession, limits: PassthroughLimits
    ) -> None:
        self._upstream = upstream
        self._session = session
        self._limits = limits
        self._slots = limits.slots
        # aiohttp refuses a message of max_msg_size bytes or more; the setting names the largest
        # message passed on, as uvicorn's ws_max_size does.
        self._ws_max_msg_size = limits.websocket_max_message_bytes + 1

    async def forward(
        self,
        request: web.Request,
        headers: Headers,
        body: bytes | None = None,
        *,
        extra_headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Pass `request` upstream and its response back, streamed both ways."""
        websocket = body is None and _is_websocket(request)
        try:
            slot = await self._slots.take(stream=websocket or asks_for_events(request))
        except UpstreamBusy:
            return await self._slots.busy(request)
        try:
            if websocket:
                return await self._forward_websocket(request, headers)
            return await self._forward_http(request, headers, body, extra_headers, slot)
        finally:
            slot.release()

    async def _forward_http(
        self,
        request: web.Request,
        headers: Headers,
        body: bytes | None,
        extra_headers: Mapping[str, str] | None,
        slot: Slot,
    ) -> web.StreamResponse:
        outgoing = outgoing_headers(request, headers)
        data: bytes | AsyncIterator[bytes] | None
        streamed: StreamedBody | None = None
        if body is not None:
            data = body
            outgoing.popall(hdrs.CONTENT_LENGTH, None)
        elif request.body_exists:
            streamed = StreamedBody(request, self._limits.body_idle_seconds)
            data = streamed.chunks()
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
            client_failed = streamed is not None and streamed.timed_out
            request[UPSTREAM_SECONDS] = self._upstream.timed(started, failed=not client_failed)
            if client_failed:
                if self._limits.stats is not None:
                    self._limits.stats.errors["body_timeout"] += 1
                return await body_timed_out(request)
            error = self._upstream.failed(exc)
            return json_error(error.status, error.detail, headers=extra_headers)
        request[UPSTREAM_SECONDS] = self._upstream.timed(started, failed=upstream.status >= 500)
        try:
            if not slot.stream and is_event_stream(upstream.headers):
                # Classified by its answer: a stream holds a stream slot, not an ordinary one.
                try:
                    await self._slots.to_streams(slot)
                except UpstreamBusy:
                    return await self._slots.busy(request)
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
                max_msg_size=self._ws_max_msg_size,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return json_error(502, f"upstream refused the WebSocket upgrade: {exc.status}")
        except Exception as exc:
            error = self._upstream.failed(exc)
            return json_error(error.status, error.detail)
        client_ws = web.WebSocketResponse(
            protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
            autoclose=False,
            max_msg_size=self._ws_max_msg_size,
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
        if request.transport is None or request.transport.is_closing():
            # The client left (a closed event stream, a cancelled download): nothing is wrong.
            log.debug("client left mid-stream: %s", type(exc).__name__)
            return response
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


def asks_for_events(request: web.BaseRequest) -> bool:
    """True when the client asks for server-sent events: a stream, held open."""
    return any(EVENT_STREAM in value.lower() for value in request.headers.getall(hdrs.ACCEPT, ()))


def is_event_stream(headers: Headers) -> bool:
    """True when a response is server-sent events."""
    media_type = headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0]
    return media_type.strip().lower() == EVENT_STREAM


def _is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get(hdrs.UPGRADE, "").lower()
    connection = request.headers.get(hdrs.CONNECTION, "").lower()
    return upgrade == "websocket" and "upgrade" in connection and request.method == "GET"


async def _pump_websockets(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    async def client_to_upstream() -> None:
        failed: int | None = None
        async for message in client:
            if message.type is WSMsgType.TEXT:
                await upstream.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await upstream.send_bytes(message.data)
            elif message.type is WSMsgType.ERROR:
                failed = _error_code(message.data)
        # Shielded: after a protocol error aiohttp has closed the client's connection already,
        # and the request's task is cancelled; the upstream must still hear why.
        await asyncio.shield(upstream.close(code=failed or client.close_code or 1000))

    async def upstream_to_client() -> None:
        failed: int | None = None
        async for message in upstream:
            if message.type is WSMsgType.TEXT:
                await client.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await client.send_bytes(message.data)
            elif message.type is WSMsgType.ERROR:
                failed = _error_code(message.data)
            elif message.type is WSMsgType.CLOSE:
                break
        code = failed or upstream.close_code or 1000
        await client.close(code=code, message=_close_reason(upstream))

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


def _error_code(error: object) -> int | None:
    """The close code a side's protocol error calls for: 1009 for a message over the bound
    (RFC 6455 7.4.1), passed on to the other side too, so that both know why it ended."""
    return error.code if isinstance(error, aiohttp.WebSocketError) else None


def _close_reason(ws: aiohttp.ClientWebSocketResponse) -> bytes:
    exc = ws.exception()
    return b"" if exc is None else b"upstream error"
