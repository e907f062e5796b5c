"""A request aiohttp cannot parse: one INFO line naming the peer, no traceback, no raw bytes."""

from __future__ import annotations

import asyncio

from tests.conftest import StartProxy
from tests.fakes.legacy_backend import FakeLegacyBackend


async def test_a_malformed_request_line_is_logged_quietly(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_proxy({"upstream.url": legacy_backend.url})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /\x00secret-bytes-9f2 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]

    for _ in range(50):  # the line is written by the log thread
        if "malformed request" in proxy.log():
            break
        await asyncio.sleep(0.05)
    log = proxy.log()
    assert "INFO aiohttp.server: malformed request from 127.0.0.1: InvalidURLError" in log
    assert "Traceback" not in log
    assert "secret-bytes-9f2" not in log
    assert legacy_backend.calls == {}
