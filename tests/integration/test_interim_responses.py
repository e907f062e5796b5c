"""Interim (1xx) responses reach the client as the origin sent them, before the final response
(RFC 9110 15.2), except where the proxy answered for itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.app import create_app
from tests.conftest import settings_for
from tests.fakes.raw_origin import RawOrigin, read_head, send

EARLY_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\n"
    b"Link: </styles.css>; rel=preload; as=style\r\n"
    b"X-My-Header: test\r\n"
    b"Connection: X-My-Hop\r\n"
    b"X-My-Hop: dropped\r\n"
    b"\r\n"
)
PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
GET = b"GET /page HTTP/1.1\r\nHost: example.test\r\n\r\n"


async def proxy_for(aiohttp_client: Any, tmp_path: Path, origin: RawOrigin) -> Any:
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(tmp_path, origin.url, **{"identity.mode": "none"}))
    )
    return client


def address(proxy: TestClient[Any, Any]) -> tuple[str, int]:
    assert proxy.server.port is not None
    return "127.0.0.1", proxy.server.port


async def test_early_hints_reach_the_client_before_the_final_response(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    final_sent = asyncio.Event()
    async with RawOrigin([EARLY_HINTS, final_sent, OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        reader, writer = await send(address(proxy), GET)

        # The origin holds its final response back until the client has the hints.
        hints = await read_head(reader)
        final_sent.set()
        final = await read_head(reader)
        body = await reader.readexactly(2)
        writer.close()

    assert (hints.status, hints.reason) == (103, "Early Hints")
    assert hints.get("Link") == "</styles.css>; rel=preload; as=style"
    assert hints.get("X-My-Header") == "test"
    assert hints.get("Via") is not None  # a forwarded message (RFC 9110 7.6.3)
    # Hop-by-hop fields are the proxy's connection's, not the client's (RFC 9110 7.6.1).
    assert hints.get("Connection") is None and hints.get("X-My-Hop") is None
    assert (final.status, body) == (200, b"ok")
    assert final.get("Link") is None  # interim fields are not the final response's


async def test_interim_responses_are_forwarded_in_order(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    async with RawOrigin([PROCESSING, EARLY_HINTS, PROCESSING, OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        reader, writer = await send(address(proxy), GET)
        statuses = [(await read_head(reader)).status for _ in range(4)]
        body = await reader.readexactly(2)
        writer.close()

    assert statuses == [102, 103, 102, 200]
    assert body == b"ok"


async def test_an_http_1_0_client_gets_no_interim_response(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    async with RawOrigin([PROCESSING, EARLY_HINTS, OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        reader, writer = await send(address(proxy), b"GET /page HTTP/1.0\r\n\r\n")
        head = await read_head(reader)
        body = await reader.read()
        writer.close()

    # HTTP/1.0 defined no 1xx status: a server MUST NOT send one to it (RFC 9110 15.2).
    assert (head.status, body) == (200, b"ok")


async def test_an_expectation_is_answered_once(aiohttp_client: Any, tmp_path: Path) -> None:
    async with RawOrigin([OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        reader, writer = await send(
            address(proxy),
            b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n",
        )
        # The proxy answers the client's expectation itself; the origin's 100 answers the
        # proxy's own request, so it is not forwarded as a second one.
        assert (await read_head(reader)).status == 100
        writer.write(b"data")
        final = await read_head(reader)
        body = await reader.readexactly(2)
        writer.close()

    assert (final.status, body) == (200, b"ok")
    assert origin.requests and b"POST /upload" in origin.requests[0]
