"""GET /_proxy/ready: 200 when the upstream, Volume and index answer; 503 naming what does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.readiness import Readiness
from tests.conftest import MakeProxyClient
from tests.fakes import FakeLegacyBackend
from tests.pg import PostgresServer


async def ready(client: Any) -> tuple[int, dict[str, Any]]:
    async with client.get("/_proxy/ready") as response:
        return response.status, await response.json()


async def test_ready_when_the_upstream_and_the_volume_answer_then_not_when_the_upstream_is_down(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client()
    status, body = await ready(client)
    assert (status, body["status"]) == (200, "ready")
    assert body["checks"] == {"upstream": "ok", "volume": "ok"}
    # A 404 from the backend is an answer: the probe never touches the backend's routes.
    assert legacy_backend.calls["/"] == 1

    await legacy_backend.stop()
    status, body = await ready(client)
    assert status == 503
    assert body["failing"] == ["upstream"]
    assert body["checks"]["volume"] == "ok"


async def test_not_ready_when_the_volume_folder_is_broken(
    make_proxy_client: MakeProxyClient, tmp_path: Path
) -> None:
    client = await make_proxy_client()
    assert (await ready(client))[0] == 200
    (tmp_path / "volume").write_text("a file where the Volume folder should be")
    status, body = await ready(client)
    assert status == 503
    assert body["failing"] == ["volume"]
    assert body["checks"]["upstream"] == "ok"


async def test_not_ready_when_postgresql_is_stopped(
    make_proxy_client: MakeProxyClient, postgres_dsn: str, postgres_server: PostgresServer
) -> None:
    client = await make_proxy_client(**{"index.dsn": postgres_dsn})
    status, body = await ready(client)
    assert status == 200 and body["checks"]["index"] == "ok"

    postgres_server.stop()
    try:
        status, body = await ready(client)
    finally:
        postgres_server.start()
    assert status == 503
    assert body["failing"] == ["index"]


async def test_no_volume_and_no_index_means_only_the_upstream_is_checked(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"cache.volume.kind": "none"})
    status, body = await ready(client)
    assert status == 200 and body["checks"] == {"upstream": "ok"}


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_check_that_hangs_fails_within_its_timeout(silent_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        readiness = Readiness(upstream_url=silent_server, session=session, timeout_seconds=0.2)
        started = asyncio.get_running_loop().time()
        assert await readiness.check() == {"upstream": "timeout"}
        assert asyncio.get_running_loop().time() - started < 1.0
