"""Shared fixtures: the fake legacy backend, settings under tmp_path, the proxy in front of it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The repository root, so `tests.fakes` imports however pytest is started (tests/ has no __init__).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from proxy.app import create_app
from proxy.config import Settings, load_settings
from tests.fakes import FakeLegacyBackend
from tests.pg import postgres_dsn, postgres_server  # noqa: F401 - fixtures for every test

REPO_VAR = Path(__file__).resolve().parent.parent / "var"

ProxyClient = TestClient[web.Request, web.Application]
MakeProxyClient = Callable[..., Awaitable[ProxyClient]]


def settings_for(tmp_path: Path, backend_url: str, **dotted_overrides: Any) -> Settings:
    """Settings for a proxy in front of `backend_url`, with its Volume under `tmp_path`.

    Dotted keys do not fit keyword names, so pass them unpacked:
    `settings_for(tmp_path, url, **{"upstream.timeout_seconds": 0.5})`.
    """
    overrides: dict[str, Any] = {
        "upstream.url": backend_url,
        "cache.volume.path": str(tmp_path / "volume"),
    }
    overrides.update(dotted_overrides)
    return load_settings(env={}, overrides=overrides)


@pytest.fixture
async def legacy_backend() -> AsyncIterator[FakeLegacyBackend]:
    """A started FakeLegacyBackend, stopped after the test."""
    backend = FakeLegacyBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


class ServedAsInProduction(TestServer):
    """aiohttp's test server, but with `run_app`'s default: handlers are not cancelled when the
    client disconnects (the test server's default cancels them, which production never does)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


@pytest.fixture
def make_proxy_client(
    aiohttp_client: AiohttpClient, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> MakeProxyClient:
    """A factory: `await make_proxy_client(**{"dotted.key": value})` -> a client of a new proxy."""

    async def make(**dotted_overrides: Any) -> ProxyClient:
        settings = settings_for(tmp_path, legacy_backend.url, **dotted_overrides)
        return await aiohttp_client(ServedAsInProduction(create_app(settings)))

    return make


@pytest.fixture
async def proxy_client(make_proxy_client: MakeProxyClient) -> ProxyClient:
    """A test client of the proxy (default settings) in front of `legacy_backend`."""
    return await make_proxy_client()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    found: dict[str, tuple[int, int]] = {"": (0, folder.stat().st_mtime_ns)}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent, name)
            try:
                status = path.lstat()
            except FileNotFoundError:
                continue
            found[str(path.relative_to(folder))] = (status.st_size, status.st_mtime_ns)
    return found


@pytest.fixture(autouse=True)
def _repo_var_untouched() -> Iterator[None]:
    """Fail a test that writes into the repository's own var/: disk state goes under tmp_path."""
    before = _snapshot(REPO_VAR)
    yield
    after = _snapshot(REPO_VAR)
    if after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))
        names = sorted({name or "var/" for name, _ in changed})[:5]
        pytest.fail(f"the test wrote into {REPO_VAR}: {names}; put disk state under tmp_path")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def toml_for(settings: Mapping[str, Any]) -> str:
    """A TOML file for dotted settings, e.g. {"server.port": 8080} -> [server] port = 8080."""
    tables: dict[str, list[str]] = {}
    for dotted, value in settings.items():
        table, _, key = dotted.rpartition(".")
        tables.setdefault(table, []).append(f"{key} = {_toml_value(value)}")
    return "".join(
        (f"[{table}]\n" if table else "") + "\n".join(lines) + "\n\n"
        for table, lines in sorted(tables.items())
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without TTS_PROXY_* / DATABRICKS_*, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TTS_PROXY_", "DATABRICKS_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


PROXY_MODULE: tuple[str, ...] = (sys.executable, "-m", "proxy")


@dataclass
class ProxyProcess:
    """`tts-cache-proxy serve` running as a child process on 127.0.0.1."""

    process: asyncio.subprocess.Process
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """The proxy's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def log(self) -> str:
        """What the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, within: float = 15.0) -> None:
        """Poll GET /_proxy/health until it answers 200; fail with the log otherwise."""
        deadline = asyncio.get_running_loop().time() + within
        async with aiohttp.ClientSession() as session:
            while asyncio.get_running_loop().time() < deadline:
                if self.process.returncode is not None:
                    break
                try:
                    async with session.get(f"{self.url}/_proxy/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        pytest.fail(
            f"the proxy did not become healthy; exit={self.process.returncode}\n{self.log()}"
        )

    async def stop(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


StartProxy = Callable[..., Awaitable[ProxyProcess]]


async def spawn_proxy(
    tmp_path: Path,
    argv: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] = PROXY_MODULE,
) -> ProxyProcess:
    """Start `command ARGV...` in tmp_path, its output in a log file there; not yet healthy."""
    log_path = tmp_path / f"proxy-{port}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_environment(**(env or {})),
            cwd=tmp_path,
        )
    return ProxyProcess(process, port, log_path)


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """A factory: `await start_proxy({"upstream.url": ...})` -> a healthy proxy child process.

    Keywords: `env` (extra environment), `command` (argv before "serve"), `wait` (poll health),
    `extra_args` (after `serve --config FILE`).
    Every process started is killed after the test.
    """
    started: list[ProxyProcess] = []

    async def start(
        settings: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] = PROXY_MODULE,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> ProxyProcess:
        values = {"cache.volume.path": str(tmp_path / "volume"), **settings}
        port = int(values.setdefault("server.port", free_port()))
        config = tmp_path / f"proxy-{port}.toml"
        config.write_text(toml_for(values))
        argv = ["serve", "--config", str(config), *extra_args]
        proxy = await spawn_proxy(tmp_path, argv, port=port, env=env, command=command)
        started.append(proxy)
        if wait:
            await proxy.wait_healthy()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()
