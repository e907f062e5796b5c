"""A request body that stops arriving gets 408 and its connection closed; a speak body is bounded
as a whole too. A body that keeps arriving, however slowly, still reaches the backend."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.conftest import MakeProxyClient, ProxyClient
from tests.fakes.legacy_backend import SPEAK_PATH, FakeLegacyBackend
from tests.security.attacker import parse_head, request_head

IDLE = 0.5
SPEAK_BODY = json.dumps(
    {"text": "hello", "message_id": "m-1", "thread_id": "t-1", "save_to_volume": True}
).encode()


async def send_slowly(
    client: ProxyClient, head: str, pieces: list[bytes], *, every: float
) -> tuple[bytes, float]:
    """Write `head`, then `pieces` `every` seconds apart, on a raw connection; return everything
    the proxy sent until it closed the connection, and the seconds that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    started = time.monotonic()
    writer.write(head.encode())

    async def trickle() -> None:
        for piece in pieces:
            await asyncio.sleep(every)
            writer.write(piece)

    dripping = asyncio.create_task(trickle())
    try:
        answer = await asyncio.wait_for(reader.read(), 10)  # until the proxy closes
    finally:
        dripping.cancel()
        writer.close()
    return answer, time.monotonic() - started


@pytest.mark.parametrize("path", [SPEAK_PATH, "/upload"])
async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closed(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend, path: str
) -> None:
    client = await make_proxy_client(**{"server.body_idle_timeout_seconds": IDLE})
    head = request_head(path, 1000, X_Forwarded_Email="alice@example.com")
    answer, seconds = await send_slowly(client, head, [b'{"text": "hel'], every=0.1)

    status, fields, body = parse_head(answer)
    assert status == 408
    assert fields["connection"] == "close"
    assert "detail" in json.loads(body)
    assert IDLE <= seconds < IDLE + 2  # the silence after the last byte, not the whole body
    metrics = await (await client.get("/_proxy/metrics")).text()
    assert 'tts_proxy_errors_total{kind="body_timeout"} 1.0' in metrics


async def test_a_chunked_pass_through_body_that_stops_gets_408(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"server.body_idle_timeout_seconds": IDLE})
    answer, seconds = await send_slowly(
        client, request_head("/upload", None), [b"5\r\nhello\r\n"], every=0.1
    )
    status, fields, _ = parse_head(answer)
    assert (status, fields["connection"]) == (408, "close")
    assert seconds < IDLE + 2


async def test_a_speak_body_that_trickles_is_cut_at_its_total_time(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(
        **{"server.body_idle_timeout_seconds": 1.0, "tts.body_timeout_seconds": 1.5}
    )
    head = request_head(SPEAK_PATH, len(SPEAK_BODY), X_Forwarded_Email="alice@example.com")
    one_byte_each = [SPEAK_BODY[i : i + 1] for i in range(len(SPEAK_BODY))]
    answer, seconds = await send_slowly(client, head, one_byte_each, every=0.3)

    status, fields, _ = parse_head(answer)
    assert (status, fields["connection"]) == (408, "close")
    assert 1.5 <= seconds < 3.5  # never silent for 1 s, yet cut at 1.5 s in all
    assert legacy_backend.calls[SPEAK_PATH] == 0


@pytest.mark.parametrize("path", [SPEAK_PATH, "/upload"])
async def test_a_slow_body_that_keeps_arriving_is_served(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend, path: str
) -> None:
    client = await make_proxy_client(**{"server.body_idle_timeout_seconds": 1.0})
    head = request_head(path, len(SPEAK_BODY), X_Forwarded_Email="alice@example.com")
    thirds = [SPEAK_BODY[:20], SPEAK_BODY[20:40], SPEAK_BODY[40:]]
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head.encode())
    for piece in thirds:
        await asyncio.sleep(0.4)  # 1.2 s in all: longer than the idle timeout, never idle that long
        writer.write(piece)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert legacy_backend.calls[path] == 1
