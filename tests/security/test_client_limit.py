"""Requests in flight per client are capped: past the cap, 429 with Retry-After, for that client
only. A client is an untrusted peer's address or the caller a trusted gateway names."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import MakeProxyClient
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.security.attacker import backend_saw, parse_head, request_head
from tests.support import SPEAK, speak_body

LIMIT = {"server.max_requests_per_client": 2}
MALLORY = {"X-Real-Ip": "203.0.113.66"}
CAROL = {"X-Real-Ip": "198.51.100.7"}


async def test_a_client_past_its_limit_gets_429_and_everyone_else_is_served(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**LIMIT)
    holders = [
        asyncio.create_task(client.get("/slow?delay=1.5", headers=MALLORY)) for _ in range(2)
    ]
    await backend_saw(legacy_backend, "/slow", 2)

    refused = await client.get("/echo", headers=MALLORY)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    assert "detail" in await refused.json()
    speak = await client.post(
        SPEAK, json=speak_body(), headers={**MALLORY, "X-Forwarded-Email": "m@example.com"}
    )
    assert speak.status == 429  # speak calls count too
    assert legacy_backend.calls["/echo"] == 0

    assert (await client.get("/echo", headers=CAROL)).status == 200
    # The gateway itself (a trusted peer naming no caller) carries everyone: not limited.
    assert (await client.get("/echo")).status == 200

    assert [(await holder).status for holder in holders] == [200, 200]
    assert (await client.get("/echo", headers=MALLORY)).status == 200  # its requests ended
    metrics = await (await client.get("/_proxy/metrics")).text()
    assert 'tts_proxy_errors_total{kind="client_limit"} 2.0' in metrics


async def test_an_untrusted_peer_is_limited_by_its_address(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**LIMIT, **{"identity.trusted_proxies": ["10.0.0.0/8"]})
    holders = [asyncio.create_task(client.get("/slow?delay=1.5")) for _ in range(2)]
    await backend_saw(legacy_backend, "/slow", 2)

    # An untrusted peer cannot name itself someone else.
    refused = await client.get("/echo", headers=CAROL)
    assert refused.status == 429
    await asyncio.gather(*holders)


async def test_a_slow_body_past_the_limit_is_refused_at_once_and_its_connection_closed(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**LIMIT)
    holders = [
        asyncio.create_task(client.get("/slow?delay=1.5", headers=MALLORY)) for _ in range(2)
    ]
    await backend_saw(legacy_backend, "/slow", 2)

    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    started = time.monotonic()
    writer.write(request_head("/upload", 1000, X_Real_Ip=MALLORY["X-Real-Ip"]).encode() + b"x")
    answer = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
    seconds = time.monotonic() - started
    writer.close()

    status, fields, _ = parse_head(answer)
    assert (status, fields["connection"], fields["retry-after"]) == (429, "close", "1")
    assert seconds < 1.0  # neither waited for nor read: closed at once
    await asyncio.gather(*holders)
