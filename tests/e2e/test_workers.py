"""`serve --workers N`: N processes on one port (SO_REUSEPORT), supervised by the parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    PROXY_MODULE,
    ProxyProcess,
    clean_environment,
    free_port,
    spawn_proxy,
    toml_for,
)
from tests.fakes import FakeLegacyBackend

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to find the workers"
)

TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"
EXIT_BOUND_SECONDS = 10.0

StartWorkers = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def start_workers(tmp_path: Path) -> AsyncIterator[StartWorkers]:
    """A factory: `await start_workers(backend_url, workers=2)` -> the parent, healthy."""
    started: list[ProxyProcess] = []

    async def start(backend_url: str, *, workers: int = 2, **settings: Any) -> ProxyProcess:
        port = free_port()
        values = {
            "server.port": port,
            "server.access_log": False,
            "upstream.url": backend_url,
            "cache.volume.path": str(tmp_path / "volume"),
            **settings,
        }
        config = tmp_path / f"proxy-{port}.toml"
        config.write_text(toml_for(values))
        argv = ["serve", "--config", str(config), "--workers", str(workers)]
        proxy = await spawn_proxy(tmp_path, argv, port=port)
        started.append(proxy)
        await proxy.wait_healthy()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            for child in children_of(proxy.pid):
                _kill(child)
            await proxy.stop()


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the command name in parentheses: state, then the parent's pid.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets `pid` holds open."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def tcp_sockets(state: str, local_port: int, remote_port: int | None = None) -> set[str]:
    """Inodes of IPv4 TCP sockets in `state` on `local_port` (and `remote_port`, if given)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, st, inode = fields[1], fields[2], fields[3], fields[9]
        if st != state or int(local.split(":")[1], 16) != local_port:
            continue
        if remote_port is not None and int(remote.split(":")[1], 16) != remote_port:
            continue
        inodes.add(inode)
    return inodes


def listens(pid: int, port: int) -> bool:
    """Whether `pid` holds a listening TCP socket on `port`."""
    return bool(socket_inodes(pid) & tcp_sockets(TCP_LISTEN, port))


def alive(pid: int) -> bool:
    """Whether `pid` still exists (a zombie is not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _health_on_new_connection(
    port: int,
) -> tuple[int, int, asyncio.StreamWriter]:
    """GET /_proxy/health on a fresh keep-alive connection: (status, client port, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /_proxy/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    client_port = int(writer.get_extra_info("sockname")[1])
    return int(status_line.split()[1]), client_port, writer


async def test_two_workers_listen_on_the_port_and_both_answer(
    start_workers: StartWorkers, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_workers(legacy_backend.url, workers=2)

    workers = children_of(proxy.pid)
    assert len(workers) == 2, proxy.log()
    # Health answers once the first worker listens; its sibling may still be starting.
    for _ in range(500):
        if all(listens(worker, proxy.port) for worker in workers):
            break
        await asyncio.sleep(0.02)
    for worker in workers:
        assert listens(worker, proxy.port), f"worker {worker} does not listen\n{proxy.log()}"
    assert not listens(proxy.pid, proxy.port), "the parent must not serve"

    # The kernel spreads new connections over the listeners; 24 connections all landing on one
    # of two workers has a probability of 2**-23.
    answered: dict[int, int] = {}
    writers = []
    try:
        for _ in range(24):
            status, client_port, writer = await _health_on_new_connection(proxy.port)
            writers.append(writer)
            assert status == 200
            connection = tcp_sockets(TCP_ESTABLISHED, proxy.port, client_port)
            owner = next(w for w in workers if socket_inodes(w) & connection)
            answered[owner] = answered.get(owner, 0) + 1
    finally:
        for writer in writers:
            writer.close()

    assert sorted(answered) == workers, answered


async def test_sigterm_drains_the_workers_and_the_parent_exits_0(
    start_workers: StartWorkers, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_workers(
        legacy_backend.url, workers=2, **{"server.shutdown_timeout_seconds": 10}
    )
    workers = children_of(proxy.pid)

    async with aiohttp.ClientSession() as session:

        async def slow_request() -> int:
            async with session.get(f"{proxy.url}/slow?delay=1.0") as response:
                await response.read()
                return response.status

        in_flight = asyncio.create_task(slow_request())
        for _ in range(250):
            if legacy_backend.calls["/slow"] == 1:
                break
            await asyncio.sleep(0.02)
        assert legacy_backend.calls["/slow"] == 1, proxy.log()

        proxy.process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(in_flight, timeout=EXIT_BOUND_SECONDS)

    assert status == 200
    code = await asyncio.wait_for(proxy.process.wait(), timeout=EXIT_BOUND_SECONDS)
    assert code == 0, proxy.log()
    assert not [pid for pid in workers if alive(pid)]


async def test_a_worker_that_dies_stops_the_others_and_the_parent_exits_non_zero(
    start_workers: StartWorkers, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_workers(legacy_backend.url, workers=2)
    dying, survivor = children_of(proxy.pid)

    os.kill(dying, signal.SIGKILL)

    code = await asyncio.wait_for(proxy.process.wait(), timeout=EXIT_BOUND_SECONDS)
    assert code != 0, proxy.log()
    assert "exited unexpectedly" in proxy.log()
    assert not alive(survivor)


def test_workers_below_1_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(toml_for({"server.port": free_port()}))

    result = subprocess.run(
        [*PROXY_MODULE, "serve", "--config", str(config), "--workers", "0"],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == "config error: --workers: must be 1 or more, got 0"
