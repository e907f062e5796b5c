"""The transparent pass-through: the real proxy in front of the fake legacy backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from yarl import URL

from tests.fakes import FakeLegacyBackend

ProxyClient = TestClient[web.Request, web.Application]
MakeProxyClient = Callable[..., Awaitable[ProxyClient]]

RAW_PATH = "/echo/a%20b/c%2Fd/%7Euser/caf%C3%A9"
RAW_QUERY = "q=a%20b%2Fc&tag=x&tag=y&tag=x&empty=&plus=1+2&pct=%7E%25&flag"


def raw_url(client: ProxyClient, raw: str) -> URL:
    """The proxy's URL for `raw` (path and query), sent byte for byte as written."""
    return URL(str(client.make_url("/")).rstrip("/") + raw, encoded=True)


def echoed_headers(document: dict[str, Any]) -> CIMultiDict[str]:
    """The request headers the backend's /echo saw, repeated ones kept in order."""
    return CIMultiDict((name, value) for name, value in document["headers"])


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_path_query_and_body_reach_the_backend_unchanged(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend, method: str
) -> None:
    body = b"" if method in {"GET", "OPTIONS"} else bytes(range(256)) * 37
    response = await proxy_client.session.request(
        method, raw_url(proxy_client, f"{RAW_PATH}?{RAW_QUERY}"), data=body or None
    )

    assert response.status == 200
    echo = await response.json()
    assert echo["method"] == method
    assert echo["path"] == RAW_PATH
    assert echo["query_string"] == RAW_QUERY
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    if body:
        seen = echoed_headers(echo)
        assert seen["Content-Length"] == str(len(body))
        assert "Transfer-Encoding" not in seen
    assert sum(legacy_backend.calls.values()) == 1


async def test_head_gets_the_headers_without_a_body(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    response = await proxy_client.head("/download?size=5000")

    assert response.status == 200
    assert response.headers["Content-Length"] == "5000"
    assert await response.read() == b""
    assert legacy_backend.calls["/download"] == 1


async def test_repeated_request_headers_are_kept_in_order(proxy_client: ProxyClient) -> None:
    headers = CIMultiDict([("X-Multi", "one"), ("X-Multi", "two"), ("X-Multi", "three")])

    response = await proxy_client.get("/echo", headers=headers)

    seen = echoed_headers(await response.json())
    assert seen.getall("X-Multi") == ["one", "two", "three"]


async def test_repeated_set_cookie_headers_reach_the_client(proxy_client: ProxyClient) -> None:
    response = await proxy_client.get("/cookies")

    assert response.status == 200
    assert response.headers.getall("Set-Cookie") == [
        "session=abc; Path=/; HttpOnly",
        "theme=dark; Path=/",
    ]


async def test_hop_by_hop_headers_are_dropped_and_forwarding_headers_added(
    proxy_client: ProxyClient,
) -> None:
    headers = CIMultiDict(
        [
            ("Connection", "keep-alive, X-Hop-Secret"),
            ("X-Hop-Secret", "only for the next hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
            ("X-End-To-End", "kept"),
        ]
    )

    response = await proxy_client.get("/echo", headers=headers)

    assert response.status == 200
    seen = echoed_headers(await response.json())
    for dropped in ("X-Hop-Secret", "Keep-Alive", "TE", "Proxy-Authorization"):
        assert dropped not in seen, dropped
    assert "x-hop-secret" not in seen.get("Connection", "").lower()
    assert seen["X-End-To-End"] == "kept"
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{proxy_client.port}"
    assert "tts-cache-proxy" in seen["Via"]
    assert "tts-cache-proxy" in response.headers["Via"]


async def test_gzip_body_passes_compressed_and_unchanged(proxy_client: ProxyClient) -> None:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(
            proxy_client.make_url("/gzip"), headers={"Accept-Encoding": "gzip"}
        ) as response,
    ):
        body = await response.read()

    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert body == FakeLegacyBackend.GZIP_BODY
    assert body != FakeLegacyBackend.GZIP_PLAIN


async def test_redirect_is_passed_to_the_client_not_followed(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    response = await proxy_client.get("/redirect", allow_redirects=False)

    assert response.status == 302
    assert response.headers["Location"] == "/echo"
    assert legacy_backend.calls["/redirect"] == 1
    assert legacy_backend.calls["/echo"] == 0


async def test_status_and_error_body_pass_through(proxy_client: ProxyClient) -> None:
    response = await proxy_client.get("/status/418")

    assert response.status == 418
    assert await response.json() == {"detail": "status 418"}


async def test_sse_events_arrive_one_at_a_time(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    arrived: list[float] = []
    events: list[bytes] = []

    async with proxy_client.get("/sse?count=3&interval=0.3") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if line.startswith(b"data:"):
                arrived.append(time.monotonic())
                events.append(line.strip())

    assert events == [b"data: event 0", b"data: event 1", b"data: event 2"]
    sent = legacy_backend.sse_sent
    assert len(sent) == 3
    # Each event reaches the client before the backend even writes the next one.
    assert arrived[0] < sent[1]
    assert arrived[1] < sent[2]
    assert arrived[1] - arrived[0] >= 0.2
    assert arrived[2] - arrived[1] >= 0.2


async def test_websocket_echoes_text_and_binary_and_relays_the_close_code(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    ws = await proxy_client.ws_connect("/ws")
    try:
        await ws.send_str("hello through the proxy")
        text = await ws.receive(timeout=5)
        await ws.send_bytes(b"\x00\x01\xfe\xff" * 100)
        binary = await ws.receive(timeout=5)
        await ws.send_str("close:4001")
        closing = await ws.receive(timeout=5)
    finally:
        await ws.close()

    assert (text.type, text.data) == (WSMsgType.TEXT, "hello through the proxy")
    assert (binary.type, binary.data) == (WSMsgType.BINARY, b"\x00\x01\xfe\xff" * 100)
    assert closing.type is WSMsgType.CLOSE
    assert ws.close_code == 4001
    assert legacy_backend.calls["/ws"] == 1


async def test_closed_upstream_port_answers_502_json(make_proxy_client: MakeProxyClient) -> None:
    client = await make_proxy_client(**{"upstream.url": f"http://127.0.0.1:{closed_port()}"})

    response = await client.get("/anything?x=1")

    assert response.status == 502
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance((await response.json())["detail"], str)


async def test_slow_upstream_answers_504_json(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**{"upstream.timeout_seconds": 0.5})

    started = time.monotonic()
    response = await client.get("/slow?delay=3")
    elapsed = time.monotonic() - started

    assert response.status == 504
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance((await response.json())["detail"], str)
    assert elapsed < 2.5
    assert legacy_backend.calls["/slow"] == 1


IDENTITY_HEADERS = {
    "X-Forwarded-Email": "mallory@example.com",
    "X-Forwarded-Access-Token": "dapi-forged-token",
}


async def test_identity_headers_from_an_untrusted_peer_are_dropped(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"identity.trusted_proxies": ["10.0.0.0/8"]})

    spoofed = {
        **IDENTITY_HEADERS,
        "X-Other": "kept",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "bank.example",
    }
    response = await client.get("/echo", headers=spoofed)

    assert response.status == 200
    seen = echoed_headers(await response.json())
    assert "X-Forwarded-Email" not in seen
    assert "X-Forwarded-Access-Token" not in seen
    assert seen["X-Other"] == "kept"
    # Scheme and host are the proxy's own view, not the untrusted client's claim.
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] != "bank.example"


async def test_identity_headers_from_a_trusted_peer_are_kept(proxy_client: ProxyClient) -> None:
    response = await proxy_client.get("/echo", headers=IDENTITY_HEADERS)

    assert response.status == 200
    seen = echoed_headers(await response.json())
    assert seen["X-Forwarded-Email"] == "mallory@example.com"
    assert seen["X-Forwarded-Access-Token"] == "dapi-forged-token"


async def test_a_speak_call_that_cannot_be_cached_reaches_the_backend_untouched(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    body = {"text": "Hello there", "voice": "af_bella", "provider": "deepgram"}
    raw = json.dumps(body).encode()

    response = await proxy_client.post(
        "/api/tts/speak", data=raw, headers={"Content-Type": "application/json"}
    )

    assert response.status == 200
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert response.headers["X-TTS-Cache"] == "disabled"
    assert response.headers["X-TTS-Provider"] == "deepgram"
    assert await response.read() == FakeLegacyBackend.audio_for("Hello there", "af_bella")
    assert legacy_backend.speak_bodies == [body]
    assert legacy_backend.calls["/api/tts/speak"] == 1


async def test_empty_speak_text_gets_the_backend_400(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    response = await proxy_client.post("/api/tts/speak", json={"text": "   "})

    assert response.status == 400
    assert await response.json() == {"detail": "Text is required"}
    assert legacy_backend.calls["/api/tts/speak"] == 1


async def test_a_client_that_goes_away_does_not_break_the_next_request(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await proxy_client.get("/slow?delay=1", timeout=aiohttp.ClientTimeout(total=0.2))

    response = await proxy_client.get("/echo")

    assert response.status == 200
    assert legacy_backend.calls["/echo"] == 1


async def test_a_body_the_backend_cuts_short_is_cut_short_for_the_client(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.truncate = True

    response = await proxy_client.post(
        "/api/tts/speak", json={"text": "Hello", "voice": "af_bella"}
    )

    assert response.status == 200
    assert response.headers["Content-Length"] == str(legacy_backend.speak.size)
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_client_closing_an_event_stream_is_not_an_upstream_failure(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.routes.passthrough")
    response = await proxy_client.get("/sse?count=40&interval=0.05")
    assert response.status == 200
    await response.content.readline()  # the first event arrived: the client leaves
    response.close()
    for _ in range(100):  # the proxy notices at its next write to the closed connection
        if any("mid-stream" in record.getMessage() for record in caplog.records):
            break
        await asyncio.sleep(0.02)

    messages = [(r.levelno, r.getMessage()) for r in caplog.records if "mid-stream" in r.message]
    assert messages, "the proxy never noticed the client leaving"
    assert all(level == logging.DEBUG for level, _ in messages), messages
    assert all(message.startswith("client left mid-stream") for _, message in messages)


async def test_an_unreachable_upstream_is_one_warning_naming_its_url(
    make_proxy_client: MakeProxyClient, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    client = await make_proxy_client(**{"upstream.url": f"http://127.0.0.1:{port}"})
    caplog.set_level(logging.WARNING, logger="proxy.upstreams.http")

    for path in ("/a", "/b", "/c"):
        assert (await client.get(path)).status == 502

    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.upstreams.http"]
    assert len(warnings) == 1, warnings
    assert f"upstream http://127.0.0.1:{port} unreachable" in warnings[0]
