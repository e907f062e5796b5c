"""A response followed by bytes past its end reaches the client as framed; the excess is
discarded, never taken for a response, and the connection is not reused (RFC 9112 6.3)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from tests.conftest import settings_for
from tests.fakes.raw_origin import RawOrigin, read_head, send

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </styles.css>; rel=preload\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def proxy_for(aiohttp_client: Any, tmp_path: Path, origin: RawOrigin) -> Any:
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(tmp_path, origin.url, **{"identity.mode": "none"}))
    )
    return client


def address(proxy: TestClient[Any, Any]) -> tuple[str, int]:
    assert proxy.server.port is not None
    return "127.0.0.1", proxy.server.port


@pytest.mark.parametrize(
    ("method", "answer", "status", "body"),
    [
        # cache-tests' headers-store-Content-Length: 10 declared, 36 sent.
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"0123456789" * 3 + b"abcdef",
            200,
            b"0123456789",
        ),
        # cache-tests' 304-etag-update-response-Content-Length: an unknown status, 36 bytes.
        (
            "GET",
            b"HTTP/1.1 999 304 Not Generated\r\nContent-Length: 10\r\n\r\n" + b"0123456789\r\n" * 3,
            999,
            b"0123456789",
        ),
        # A 304 has no content whatever its fields say (RFC 9112 6.3, rule 1).
        (
            "GET",
            b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 5\r\n\r\nhello',
            304,
            b"",
        ),
        # Nor has a response to HEAD.
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b""),
        # A chunked body ends at its last chunk.
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\njunk\r\n",
            200,
            b"ok",
        ),
        # Interim responses and the final one in one read, then the excess.
        ("GET", EARLY_HINTS + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokjunk", 200, b"ok"),
    ],
    ids=[
        "content-length-short",
        "unknown-status",
        "304-with-content",
        "head-with-content",
        "chunked",
        "after-early-hints",
    ],
)
async def test_bytes_past_the_end_of_a_response_are_discarded(
    aiohttp_client: Any, tmp_path: Path, method: str, answer: bytes, status: int, body: bytes
) -> None:
    async with RawOrigin([answer], [OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        response = await proxy.request(method, "/page")
        assert response.status == status
        assert await response.read() == body
        assert response.headers["Via"]

        # The connection is not reused: where the next response starts is unknown.
        again = await proxy.get("/page")
        assert (again.status, await again.read()) == (200, b"ok")
        assert origin.connections == 2


async def test_a_second_response_to_one_request_is_never_forwarded(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    spliced = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nspliced"
    async with RawOrigin([OK + spliced], [OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        first = await proxy.get("/page")
        assert await first.read() == b"ok"
        second = await proxy.get("/page")
        # A client MUST NOT process or forward extra data as a separate response (RFC 9112 6.3).
        assert await second.read() == b"ok"
        assert origin.connections == 2


async def test_early_hints_in_an_earlier_read_are_delivered_once(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    final_sent = asyncio.Event()
    excess = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokjunk"
    async with RawOrigin([EARLY_HINTS, final_sent, excess], [OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        reader, writer = await send(address(proxy), b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
        hints = await read_head(reader)
        final_sent.set()
        final = await read_head(reader)
        body = await reader.readexactly(2)
        writer.close()

    assert (hints.status, final.status, body) == (103, 200, b"ok")


async def test_an_invalid_content_length_is_a_502(aiohttp_client: Any, tmp_path: Path) -> None:
    # The framing is unknown: a proxy MUST answer 502 and close (RFC 9112 6.3, rule 5).
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok"
    async with RawOrigin([answer], [OK]) as origin:
        proxy = await proxy_for(aiohttp_client, tmp_path, origin)
        response = await proxy.get("/page")
        assert response.status == 502
        again = await proxy.get("/page")
        assert (again.status, await again.read()) == (200, b"ok")
        assert origin.connections == 2
