"""The CLI writes one bare JSON line per request to stderr: `serve`, `serve --workers`, `demo`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyProcess, StartProxy, free_port, spawn_proxy, toml_for
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, speak_body

Launch = Callable[..., Any]


def access_lines(log: str) -> list[dict[str, Any]]:
    """The log lines that are JSON objects (the access log), parsed."""
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def wait_for_line(proxy: ProxyProcess, **wanted: Any) -> dict[str, Any]:
    """The first access line with the `wanted` fields, within 10 s."""
    for _ in range(200):
        for line in access_lines(proxy.log()):
            if all(line.get(k) == v for k, v in wanted.items()):
                return line
        await asyncio.sleep(0.05)
    pytest.fail(f"no access line with {wanted}:\n{proxy.log()}")


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start `python -m proxy ARGS...` in tmp_path, logging to a file; killed after the test."""
    started: list[ProxyProcess] = []

    async def start(*args: str, port: int) -> ProxyProcess:
        proxy = await spawn_proxy(tmp_path, args, port=port)
        started.append(proxy)
        await proxy.wait_healthy()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()


async def test_serve_logs_json_lines_with_the_request_id(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_proxy({"upstream.url": legacy_backend.url})
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/api/tts/speak",
            json=speak_body(text="do not log me"),
            headers={**ALICE, "X-Request-Id": "cli-1"},
        ) as response:
            assert response.headers["X-Request-Id"] == "cli-1"
            await response.read()
        async with session.post(
            f"{proxy.url}/api/tts/speak",
            json=speak_body(text="do not log me"),
            headers={**ALICE, "X-Request-Id": "cli-2"},
        ) as response:
            assert response.headers["X-TTS-Cache"] == "hit"
            await response.read()
    line = await wait_for_line(proxy, request_id="cli-1")
    assert line["cache"] == "miss" and line["path"] == "/api/tts/speak"
    # The hit's line is made by the writer thread from the values taken at the response.
    hit = await wait_for_line(proxy, request_id="cli-2")
    assert (hit["cache"], hit["tier"], hit["status"]) == ("hit", "memory", 200)
    assert hit["key"] == line["key"] and hit["key"] is not None
    assert hit["upstream_ms"] is None and hit["total_ms"] >= 0
    assert "do not log me" not in proxy.log()


async def test_workers_log_json_lines_too(
    launch: Launch, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "workers.toml"
    config.write_text(
        toml_for(
            {
                "server.port": port,
                "upstream.url": legacy_backend.url,
                "cache.volume.path": str(tmp_path / "volume"),
            }
        )
    )
    proxy = await launch("serve", "--config", str(config), "--workers", "2", port=port)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/_proxy/ready", headers={"X-Request-Id": "w-1"}):
            pass
    line = await wait_for_line(proxy, request_id="w-1")
    assert line["path"] == "/_proxy/ready" and line["status"] == 200


async def test_demo_logs_json_lines_too(launch: Launch) -> None:
    port, backend_port = free_port(), free_port()
    proxy = await launch(
        "demo", "--port", str(port), "--backend-port", str(backend_port), port=port
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{proxy.url}/api/tts/speak",
            json=speak_body(),
            headers={**ALICE, "X-Request-Id": "demo-1"},
        ) as response:
            assert response.status == 200
            await response.read()
    line = await wait_for_line(proxy, request_id="demo-1")
    assert line["cache"] == "miss" and line["upstream_ms"] > 0
