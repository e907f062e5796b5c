"""WebSocket messages are bounded both ways: past the bound the connection closes with 1009."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType

from tests.conftest import MakeProxyClient, StartProxy
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.security.attacker import MIB, send_oversized_frame, vm_rss_kib

BOUND = 64 * 1024
MESSAGE_TOO_BIG = 1009


async def _backend_close_code(backend: FakeLegacyBackend) -> int | None:
    for _ in range(100):
        if backend.ws_close_codes:
            return backend.ws_close_codes[-1]
        await asyncio.sleep(0.02)
    return None


async def test_a_client_message_over_the_bound_closes_both_sides_with_1009(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**{"upstream.websocket_max_message_bytes": BOUND})
    ws = await client.ws_connect("/ws")
    await ws.send_bytes(b"a" * BOUND)  # the bound itself passes, as uvicorn's max size does
    echoed = await ws.receive(timeout=5)
    assert (echoed.type, len(echoed.data)) == (WSMsgType.BINARY, BOUND)

    await ws.send_bytes(b"b" * (BOUND + 1))
    closing = await ws.receive(timeout=5)
    assert closing.type is WSMsgType.CLOSE
    assert closing.data == MESSAGE_TOO_BIG
    await ws.close()
    assert await _backend_close_code(legacy_backend) == MESSAGE_TOO_BIG


async def test_a_backend_message_over_the_bound_closes_both_sides_with_1009(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(**{"upstream.websocket_max_message_bytes": BOUND})
    ws = await client.ws_connect("/ws")
    await ws.send_str(f"send:{BOUND}")
    within = await ws.receive(timeout=5)
    assert (within.type, len(within.data)) == (WSMsgType.BINARY, BOUND)

    await ws.send_str(f"send:{BOUND + 1}")
    closing = await ws.receive(timeout=5)
    assert closing.type is WSMsgType.CLOSE
    assert closing.data == MESSAGE_TOO_BIG
    await ws.close()
    assert await _backend_close_code(legacy_backend) == MESSAGE_TOO_BIG


async def test_a_300_mib_frame_is_refused_before_it_is_buffered(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_proxy({"upstream.url": legacy_backend.url})  # the default bound, 16 MiB
    before = vm_rss_kib(proxy.pid)
    close_code, sent = await send_oversized_frame(proxy.port, 300 * MIB)
    await asyncio.sleep(0.3)
    after = vm_rss_kib(proxy.pid)

    assert close_code == MESSAGE_TOO_BIG
    assert sent < 300 * MIB  # the proxy stopped reading long before the frame's end
    assert after - before < 32 * 1024, (before, after)  # KiB: far below the 300 MiB frame
