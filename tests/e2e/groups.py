"""Groups of `serve --workers N` as the fleet's end-to-end tests start them, and their numbers.

Which worker answered a request is read from /proc: the worker holding the request's connection
(as in test_workers.py), so no header tells users anything about workers. `start_group` is a
fixture (registered by tests/e2e/conftest.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyProcess, free_port, spawn_proxy, toml_for
from tests.e2e.test_workers import TCP_ESTABLISHED, children_of, socket_inodes, tcp_sockets
from tests.support import ALICE, SPEAK, TOKEN, speak_body

# Requests tried before a test gives up on the kernel reaching every worker (each new connection
# lands on one of N workers at random: 120 tries all missing one of 4 has odds below 1e-14).
TRIES = 120


@dataclass(frozen=True)
class Answer:
    """One request's answer, and the worker that gave it."""

    status: int
    headers: dict[str, str]
    body: bytes
    worker: int


@dataclass
class Group:
    """One `serve --workers N` and its config file."""

    proxy: ProxyProcess
    config: Path
    workers: list[int]

    async def ask(self, method: str, path: str, **kwargs: Any) -> Answer:
        """`method path` on a new connection; the answer and the worker holding it."""
        # The client's own port, chosen here, names the connection in /proc/net/tcp; the
        # session keeps the connection open (keep-alive) until the worker holding it is found.
        client_port = free_port()
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", client_port))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(method, f"{self.proxy.url}{path}", **kwargs) as response:
                body = await response.read()
                status, headers = response.status, dict(response.headers)
            connection = tcp_sockets(TCP_ESTABLISHED, self.proxy.port, client_port)
            worker = next(w for w in self.workers if socket_inodes(w) & connection)
            return Answer(status, headers, body, worker)

    async def speak(self, **change: Any) -> Answer:
        """A speak call for Alice's first message (unless changed)."""
        return await self.ask("POST", SPEAK, json=speak_body(**change), headers=ALICE)

    async def on_every_worker(
        self, ask: Callable[[], Awaitable[Answer]], *, each: int = 1
    ) -> list[Answer]:
        """Ask until every worker answered `each` times; every answer, in order."""
        answers: list[Answer] = []
        for _ in range(TRIES):
            answers.append(await ask())
            seen = [a.worker for a in answers]
            if all(seen.count(worker) >= each for worker in self.workers):
                return answers
        pytest.fail(f"the kernel never spread {TRIES} connections over {self.workers}")


StartGroup = Callable[..., Awaitable[Group]]


@pytest.fixture
async def start_group(tmp_path: Path) -> AsyncIterator[StartGroup]:
    """A factory: `await start_group(backend_url, workers=3, **settings)` -> a healthy group."""
    started: list[ProxyProcess] = []

    async def start(backend_url: str, *, workers: int, **settings: Any) -> Group:
        port = free_port()
        values = {
            "server.port": port,
            "server.access_log": False,
            "upstream.url": backend_url,
            "cache.volume.path": str(tmp_path / "volume"),
            "admin.token": TOKEN,
            **settings,
        }
        config = tmp_path / f"proxy-{port}.toml"
        config.write_text(toml_for(values))
        argv = ["serve", "--config", str(config), "--workers", str(workers)]
        proxy = await spawn_proxy(tmp_path, argv, port=port)
        started.append(proxy)
        await proxy.wait_healthy()
        for _ in range(500):  # a worker listens once its socket for the group is up too
            pids = children_of(proxy.pid)
            if len(pids) == workers and all(_listens(pid, port) for pid in pids):
                return Group(proxy, config, pids)
            await asyncio.sleep(0.02)
        pytest.fail(f"the workers did not all listen\n{proxy.log()}")

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()


def _listens(pid: int, port: int) -> bool:
    return bool(socket_inodes(pid) & tcp_sockets("0A", port))


async def scrape(group: Group) -> tuple[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    answer = await group.ask("GET", "/_proxy/metrics")
    assert answer.status == 200, answer.body
    samples = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return answer.worker, samples


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]
