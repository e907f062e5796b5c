"""Speak misses against raw socket backends: a body that runs to the connection's close (RFC 9112
6.3) is whole after a close and cut by a reset, never stored then; a connect timeout is a 502."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from tests.conftest import settings_for
from tests.support import ALICE, SPEAK, speak_body

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n\r\n"
PART = b"ID3" + b"a" * 2000
REST = b"b" * 3000


class UntilCloseBackend:
    """A raw socket server that answers each speak call with a body delimited by the close:
    the head and PART, then, once the test cuts it, REST and a close (FIN) or a reset (RST)."""

    def __init__(self, ending: str) -> None:
        self.ending = ending
        self.calls = 0
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self.cut.set()  # an answer still waiting for its cut ends now
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            await reader.readexactly(length)
            self.calls += 1
            writer.write(HEAD + PART)
            await writer.drain()
            await asyncio.wait_for(self.cut.wait(), 10)
            self.cut.clear()
            if self.ending == "reset":
                # Linger on, for 0 s: the close sends RST instead of FIN.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(REST)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        writer.close()


@pytest.fixture
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[UntilCloseBackend]:
    server = UntilCloseBackend(request.param)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def proxy_for(aiohttp_client: Any, tmp_path: Path, backend: UntilCloseBackend) -> Any:
    client: TestClient[Any, Any] = await aiohttp_client(
        create_app(settings_for(tmp_path, backend.url))
    )
    return client


async def speak_and_cut(
    proxy: TestClient[Any, Any], backend: UntilCloseBackend
) -> tuple[int, str | None, bytes, bool]:
    """One speak call: its first bytes read, the backend told to end its answer, the rest
    read; returns status, X-TTS-Cache, the bytes and whether the response ended cleanly."""
    async with proxy.post(SPEAK, json=speak_body(), headers=ALICE) as response:
        received = bytearray(await response.content.readany())
        backend.cut.set()
        try:
            received += await response.read()
            complete = True
        except aiohttp.ClientPayloadError:
            complete = False
        return response.status, response.headers.get("X-TTS-Cache"), bytes(received), complete


@pytest.mark.parametrize("backend", ["reset"], indirect=True)
async def test_a_body_cut_by_a_reset_is_not_complete_and_never_stored(
    aiohttp_client: Any, tmp_path: Path, backend: UntilCloseBackend
) -> None:
    proxy = await proxy_for(aiohttp_client, tmp_path, backend)
    status, cache, received, complete = await speak_and_cut(proxy, backend)
    assert (status, cache) == (200, "miss")
    assert received.startswith(b"ID3") and len(received) <= len(PART)
    assert not complete  # the truncated recording does not pass for a whole one
    status, cache, _, complete = await speak_and_cut(proxy, backend)
    assert (status, cache, complete) == (200, "miss", False)
    assert backend.calls == 2  # nothing was stored


@pytest.mark.parametrize("backend", ["close"], indirect=True)
async def test_a_body_ended_by_a_close_is_complete(
    aiohttp_client: Any, tmp_path: Path, backend: UntilCloseBackend
) -> None:
    proxy = await proxy_for(aiohttp_client, tmp_path, backend)
    status, cache, received, complete = await speak_and_cut(proxy, backend)
    assert (status, cache, received, complete) == (200, "miss", PART + REST, True)
    # Stored as any 200 audio is: the next call is a hit, the backend is not asked again.
    async with proxy.post(SPEAK, json=speak_body(), headers=ALICE) as response:
        assert response.headers["X-TTS-Cache"] == "hit"
        assert await response.read() == PART + REST
    assert backend.calls == 1


async def test_a_backend_that_cannot_be_connected_to_in_time_is_a_502(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    # A listening socket whose accept queue is full: the kernel drops further SYNs unanswered.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    waiting = [socket.socket() for _ in range(3)]
    try:
        for sock in waiting:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        await asyncio.sleep(0.1)
        settings = settings_for(
            tmp_path, f"http://127.0.0.1:{port}", **{"upstream.connect_timeout_seconds": 0.3}
        )
        proxy: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
        async with proxy.post(SPEAK, json=speak_body(), headers=ALICE) as response:
            assert response.status == 502  # the backend never got the request: not a 504
            assert response.headers["X-TTS-Cache"] == "miss"
            assert await response.json() == {
                "detail": "upstream unavailable (ConnectionTimeoutError)"
            }
    finally:
        for sock in [*waiting, listener]:
            sock.close()
