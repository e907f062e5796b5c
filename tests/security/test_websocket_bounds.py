"""WebSocket messages are bounded both ways: past the bound the connection closes with 1009."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from pathlib import Path

from aiohttp import WSMsgType

from tests.conftest import MakeProxyClient, StartProxy
from tests.fakes.legacy_backend import FakeLegacyBackend

BOUND = 64 * 1024
MESSAGE_TOO_BIG = 1009
MIB = 1024 * 1024


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


def vm_rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


async def send_oversized_frame(port: int, size: int) -> tuple[int | None, int]:
    """Open a WebSocket through the proxy on a raw socket and start one binary frame of `size`
    bytes; stream its payload until the proxy stops reading. (close code seen, bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    # FIN + binary, masked, a 64-bit length; a zero mask leaves the payload as sent.
    writer.write(b"\x82\xff" + struct.pack("!Q", size) + b"\x00\x00\x00\x00")
    sent = 0
    chunk = bytes(MIB)
    close_code: int | None = None
    frame = asyncio.ensure_future(reader.read(4))
    try:
        while sent < size and not frame.done():
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
        answer = await asyncio.wait_for(frame, 5)
        if len(answer) >= 4 and answer[0] == 0x88:  # a close frame: its first two bytes, the code
            close_code = struct.unpack("!H", answer[2:4])[0]
    finally:
        frame.cancel()
        writer.close()
    return close_code, sent


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
