"""A worker whose key's owner is gone or hung fills the key itself, within the bound.

One real worker (the proxy app as `serve --workers N` builds it, in this test process) shares a
group folder with a sibling socket that misbehaves: no listener at all (a dead worker), a
listener that never answers (a hung one), and one that starts a fill's answer and then falls
silent. The key is chosen so that the misbehaving sibling owns it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import create_app
from proxy.fleet.group import WorkerGroup
from proxy.fleet.wire import ACCEPTED, DATA, HEAD, Head, frame
from proxy.speak import CacheKey
from proxy.state import CACHE, STATS
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, SPEAK, speak, speak_body

OWNER_TIMEOUT = 0.5
KEY = CacheKey("alice@example.com", "t-1", "m-1", "af_nicole")
AUDIO = FakeLegacyBackend.audio_for("Hello there", "af_nicole")

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def owner_pid() -> int:
    """A pid beside this process's that `KEY` hashes to, over the two of them."""
    mine = os.getpid()
    below = int(KEY.digest(), 16) % 2 == 0  # the owner is the lower pid of the two
    return mine - 1 if below else mine + 1


@pytest.fixture
def group(tmp_path: Path) -> WorkerGroup:
    folder = tmp_path / "group"
    folder.mkdir(mode=0o700)
    return WorkerGroup(folder, 2, "t0k3n")


@pytest.fixture
async def worker(
    aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path, group: WorkerGroup
) -> Any:
    settings = settings_for(
        tmp_path, legacy_backend.url, **{"fleet.owner_timeout_seconds": OWNER_TIMEOUT}
    )
    return await aiohttp_client(create_app(settings, group=group))


@pytest.fixture
async def serve_peer(group: WorkerGroup) -> AsyncIterator[Callable[[Peer], Awaitable[None]]]:
    servers: list[asyncio.Server] = []

    async def serve(peer: Peer) -> None:
        path = group.socket_path(owner_pid())
        servers.append(await asyncio.start_unix_server(peer, path=str(path)))

    yield serve
    for server in servers:
        server.close()


async def hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Takes the connection, reads the request, never answers (a stopped process)."""
    await reader.read(65536)
    await asyncio.sleep(3600)


async def test_a_dead_owner_is_passed_over_at_once(
    worker: Any, legacy_backend: FakeLegacyBackend, group: WorkerGroup
) -> None:
    # A socket file nobody listens on: what a killed worker leaves.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(group.socket_path(owner_pid())))
    listener.close()

    answer = await speak(worker, SPEAK, speak_body())

    assert answer.status == 200 and answer.body == AUDIO and answer.cache == "miss"
    assert legacy_backend.calls[SPEAK] == 1
    assert dict(worker.app[STATS].fleet_fills) == {"owner_fallback": 1}


async def test_a_hung_owner_is_passed_over_after_the_bound(
    worker: Any,
    legacy_backend: FakeLegacyBackend,
    serve_peer: Callable[[Peer], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await serve_peer(hangs)

    started = time.monotonic()
    answers = await asyncio.gather(*(speak(worker, SPEAK, speak_body()) for _ in range(3)))
    seconds = time.monotonic() - started

    assert all(a.status == 200 and a.body == AUDIO for a in answers)
    assert seconds >= OWNER_TIMEOUT  # it did wait for the owner, then no longer
    assert legacy_backend.calls[SPEAK] == 1  # the three joined this worker's own fill
    assert dict(worker.app[STATS].fleet_fills) == {"owner_fallback": 1}
    assert "did not take the miss" in caplog.text


async def test_an_owner_that_falls_silent_mid_body_cuts_its_clients_within_the_bound(
    worker: Any, legacy_backend: FakeLegacyBackend, serve_peer: Callable[[Peer], Awaitable[None]]
) -> None:
    async def starts_then_stalls(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(65536)
        head = Head(
            200,
            "OK",
            (("Content-Type", "audio/mpeg"), ("Content-Length", "65536")),
            0.1,
            joined=False,
            stored=True,
        )
        frames = frame(ACCEPTED) + frame(HEAD, head.to_bytes()) + frame(DATA, AUDIO[:1000])
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(frames), frames))
        await writer.drain()
        await asyncio.sleep(3600)

    await serve_peer(starts_then_stalls)

    started = time.monotonic()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with worker.post(SPEAK, json=speak_body(), headers=ALICE) as response:
            assert response.status == 200
            await response.read()
    assert time.monotonic() - started < 10 * OWNER_TIMEOUT
    assert legacy_backend.calls[SPEAK] == 0
    assert dict(worker.app[STATS].fleet_fills) == {"owner": 1}
    assert worker.app[CACHE].get_memory(KEY) is None  # nothing half-received was kept


async def test_the_owner_refuses_what_is_not_a_miss_and_serves_on(
    worker: Any, legacy_backend: FakeLegacyBackend, group: WorkerGroup
) -> None:
    connector = aiohttp.UnixConnector(path=str(group.socket_path(os.getpid())))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post("http://worker/fleet/fills", data=b"\x00\x00\x00\x05junk!") as r:
            assert r.status == 400 and "bad head" in (await r.json())["error"]
    answer = await speak(worker, SPEAK, speak_body())
    assert answer.status == 200 and answer.body == AUDIO
