"""Upstream slots: the wait for one is bounded (503 with Retry-After past it), and long-lived
streams have a pool of their own, so they never take the slots ordinary requests need."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import MakeProxyClient, ProxyClient
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.security.attacker import backend_saw
from tests.support import ALICE, SPEAK, speak_body

WAIT = 0.5
# Two ordinary slots and one for streams.
SMALL_POOLS: dict[str, Any] = {
    "upstream.max_connections": 3,
    "upstream.max_streams": 1,
    "upstream.slot_wait_seconds": WAIT,
}
EVENTS = {"Accept": "text/event-stream"}
LONG_SSE = "/sse?count=200&interval=0.05"


async def timed_get(client: ProxyClient, path: str, **kwargs: Any) -> tuple[int, float]:
    started = time.monotonic()
    async with client.get(path, **kwargs) as response:
        await response.read()
        return response.status, time.monotonic() - started


async def test_a_request_that_finds_no_free_slot_gets_503_with_retry_after(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**SMALL_POOLS)
    holders = [asyncio.create_task(client.get("/slow?delay=2")) for _ in range(2)]
    await backend_saw(legacy_backend, "/slow", 2)

    started = time.monotonic()
    refused = await client.get("/echo")
    seconds = time.monotonic() - started
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert "detail" in await refused.json()
    assert WAIT <= seconds < WAIT + 1.5
    assert legacy_backend.calls["/echo"] == 0

    assert [(await holder).status for holder in holders] == [200, 200]
    assert (await client.get("/echo")).status == 200  # the slots came back
    metrics = await (await client.get("/_proxy/metrics")).text()
    assert 'tts_proxy_errors_total{kind="upstream_busy"} 1.0' in metrics


async def test_a_speak_miss_waits_for_an_ordinary_slot_too(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**SMALL_POOLS)
    holders = [asyncio.create_task(client.get("/slow?delay=2")) for _ in range(2)]
    await backend_saw(legacy_backend, "/slow", 2)

    refused = await client.post(SPEAK, json=speak_body(), headers=ALICE)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["X-TTS-Cache"] == "miss"
    assert "detail" in await refused.json()
    assert legacy_backend.calls[SPEAK] == 0

    await asyncio.gather(*holders)
    served = await client.post(SPEAK, json=speak_body(), headers=ALICE)
    assert served.status == 200
    assert len(await served.read()) == legacy_backend.speak.size


async def test_streams_never_take_the_ordinary_slots(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**SMALL_POOLS)
    held = await client.get(LONG_SSE, headers=EVENTS)
    assert held.status == 200
    await held.content.readline()  # the stream is open and holds the one stream slot

    # Another stream, known by what it asks for, waits for a stream slot, then is refused.
    by_request = await client.get(LONG_SSE, headers=EVENTS)
    assert by_request.status == 503
    assert by_request.headers["Retry-After"] == "1"
    # One that asked for anything gets an event stream: classified by the answer, refused too.
    by_answer = await client.get(LONG_SSE)
    assert by_answer.status == 503
    # A WebSocket is a stream as well.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused_ws:
        await client.ws_connect("/ws")
    assert refused_ws.value.status == 503

    # Meanwhile both ordinary slots are there, at once, for ordinary requests.
    answers = await asyncio.gather(timed_get(client, "/echo"), timed_get(client, "/echo"))
    assert [status for status, _ in answers] == [200, 200]
    assert max(seconds for _, seconds in answers) < WAIT
    held.close()
