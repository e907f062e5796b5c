"""`serve -- CMD` and DATABRICKS_APP_PORT: the proxy starts, watches and stops the legacy app."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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

# A stand-in legacy app: it listens where DATABRICKS_APP_PORT says, as a Databricks App does.
BACKEND = """
import asyncio, os, signal, sys, time
from aiohttp import web

port = int(os.environ["DATABRICKS_APP_PORT"])
if os.environ.get("BACKEND_IGNORES_SIGTERM"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(float(os.environ.get("BACKEND_START_DELAY", "0")))

async def env(request):
    names = ("DATABRICKS_APP_PORT", "PORT", "UVICORN_PORT", "UVICORN_HOST", "DATABRICKS_VOLUME")
    return web.json_response({**{name: os.environ.get(name) for name in names}, "argv": sys.argv})

async def slow(request):
    await asyncio.sleep(float(request.query["delay"]))
    return web.json_response({"slept": float(request.query["delay"])})

async def exit_soon(app):
    delay = os.environ.get("BACKEND_EXIT_AFTER")
    if delay:
        asyncio.get_running_loop().call_later(float(delay), os._exit, 3)

async def stopping(app):
    print("backend: stopping", flush=True)

app = web.Application()
app.router.add_get("/env", env)
app.router.add_get("/slow", slow)
app.on_startup.append(exit_soon)
app.on_shutdown.append(stopping)
print(f"backend: listening on {port}", flush=True)
web.run_app(app, host="127.0.0.1", port=port, print=None, shutdown_timeout=5)
"""
# The platform's bound: SIGKILL 15 s after SIGTERM.
PLATFORM_STOP_SECONDS = 15.0

Start = Callable[..., Awaitable[ProxyProcess]]
# One process, and workers sharing the one backend their parent started.
WORKERS = [pytest.param(1, id="one-process"), pytest.param(2, id="two-workers")]


@pytest.fixture
async def start_supervised(tmp_path: Path) -> AsyncIterator[Start]:
    """A factory: the proxy on DATABRICKS_APP_PORT with the stand-in backend behind it."""
    started: list[ProxyProcess] = []

    async def start(
        settings: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        backend: Sequence[str] | None = None,
        workers: int = 1,
        port: int | None = None,
    ) -> ProxyProcess:
        script = tmp_path / "backend.py"
        script.write_text(BACKEND)
        command = backend or [sys.executable, str(script), str(tmp_path / "backend.pid")]
        # The platform's 0.0.0.0 default gives way to an explicit host: tests listen on loopback.
        values = {
            "cache.volume.path": str(tmp_path / "volume"),
            "server.host": "127.0.0.1",
            **(settings or {}),
        }
        config = tmp_path / "proxy.toml"
        config.write_text(toml_for(values))
        port = port or free_port()
        # As Databricks Apps (and `databricks apps run-local`) set them: every port variable
        # names the app's own port, which is the proxy's.
        environment = {
            "DATABRICKS_APP_PORT": str(port),
            "PORT": str(port),
            "UVICORN_PORT": str(port),
            "UVICORN_HOST": "0.0.0.0",
            **(env or {}),
        }
        argv = ["serve", "--config", str(config), "--workers", str(workers), "--", *command]
        proxy = await spawn_proxy(tmp_path, argv, port=port, env=environment)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()


def backend_pid(tmp_path: Path) -> int:
    """The stand-in backend's process id, as it wrote it."""
    return int((tmp_path / "backend.pid").read_text())


def gone(pid: int) -> bool:
    """Whether no process `pid` runs any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def ready_status(proxy: ProxyProcess) -> int:
    """GET /_proxy/ready's status."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}/_proxy/ready") as response,
    ):
        return response.status


async def wait_ready(proxy: ProxyProcess, within: float = 10.0) -> None:
    """Poll /_proxy/ready until 200; fail with the log otherwise."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await ready_status(proxy) == 200:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the proxy never became ready\n{proxy.log()}")


@pytest.mark.parametrize("workers", WORKERS)
async def test_backend_gets_its_own_port_and_readiness_waits_for_it(
    start_supervised: Start,
    workers: int,
) -> None:
    proxy = await start_supervised(env={"BACKEND_START_DELAY": "1.5"}, workers=workers)

    await proxy.wait_healthy()
    # Listening at once: health 200, readiness 503 until the backend answers.
    assert await ready_status(proxy) == 503, proxy.log()
    await wait_ready(proxy)

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/env") as response:
            assert response.status == 200
            seen = await response.json()
    assert seen["DATABRICKS_APP_PORT"] == seen["PORT"] == seen["UVICORN_PORT"]
    assert seen["PORT"] != str(proxy.port)
    assert seen["UVICORN_HOST"] == "127.0.0.1"
    # One backend, whatever the number of workers; its stdout passes through.
    assert proxy.log().count("backend: listening on") == 1, proxy.log()
    assert f"backend: listening on {seen['PORT']}" in proxy.log()


@pytest.mark.parametrize("workers", WORKERS)
async def test_the_backend_port_placeholder_and_the_variables_kept_from_it(
    start_supervised: Start, workers: int, tmp_path: Path
) -> None:
    script = tmp_path / "backend.py"
    command = [sys.executable, str(script), str(tmp_path / "backend.pid"), "--port={backend_port}"]
    proxy = await start_supervised(
        {"upstream.command_env_unset": ["DATABRICKS_VOLUME"]},
        env={"DATABRICKS_VOLUME": "/Volumes/main/chat/tts/"},
        backend=command,
        workers=workers,
    )
    await proxy.wait_healthy()
    await wait_ready(proxy)

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/env") as response:
            seen = await response.json()
    assert seen["argv"][-1] == f"--port={seen['PORT']}"
    assert seen["DATABRICKS_VOLUME"] is None  # the proxy's Volume, not the backend's


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize(
    "argument", ["{port}", "--port={port}", "0.0.0.0:{port}"], ids=["bare", "option", "bind"]
)
async def test_a_backend_argument_naming_the_proxy_port_is_refused(
    start_supervised: Start, workers: int, argument: str
) -> None:
    # What the platform leaves of `--port $DATABRICKS_APP_PORT` in the legacy app's command.
    port = free_port()
    given = argument.format(port=port)
    backend = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", given]
    proxy = await start_supervised(backend=backend, workers=workers, port=port)

    code = await asyncio.wait_for(proxy.process.wait(), timeout=10)

    assert code == 2
    assert proxy.log().strip().splitlines() == [
        f"config error: upstream.command: argument {given!r} is the proxy's own port {port}: "
        "drop it (the backend gets its port as DATABRICKS_APP_PORT, PORT and UVICORN_PORT) "
        "or write {backend_port}"
    ]


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_finishes_the_request_in_flight_and_stops_the_backend(
    start_supervised: Start, workers: int, signum: int, tmp_path: Path
) -> None:
    proxy = await start_supervised(workers=workers)
    await proxy.wait_healthy()
    await wait_ready(proxy)
    backend = backend_pid(tmp_path)

    async with aiohttp.ClientSession() as session:

        async def slow_request() -> tuple[int, Any]:
            async with session.get(f"{proxy.url}/slow?delay=1.5") as response:
                return response.status, await response.json()

        in_flight = asyncio.create_task(slow_request())
        await asyncio.sleep(0.5)
        stopped_at = time.monotonic()
        proxy.process.send_signal(signum)
        status, body = await asyncio.wait_for(in_flight, timeout=5)
        code = await asyncio.wait_for(proxy.process.wait(), timeout=PLATFORM_STOP_SECONDS)

    assert (status, body) == (200, {"slept": 1.5})
    assert code == 0, proxy.log()
    assert time.monotonic() - stopped_at < PLATFORM_STOP_SECONDS
    assert "backend: stopping" in proxy.log()  # it got the signal and stopped gracefully
    assert gone(backend)


@pytest.mark.parametrize("workers", WORKERS)
async def test_a_backend_deaf_to_sigterm_is_killed_within_stop_seconds(
    start_supervised: Start, workers: int, tmp_path: Path
) -> None:
    settings = {"upstream.stop_seconds": 3.0}
    proxy = await start_supervised(settings, env={"BACKEND_IGNORES_SIGTERM": "1"}, workers=workers)
    await proxy.wait_healthy()
    await wait_ready(proxy)
    backend = backend_pid(tmp_path)
    stopped_at = time.monotonic()

    proxy.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proxy.process.wait(), timeout=10)

    assert time.monotonic() - stopped_at < 3.0 + 1.5, proxy.log()
    assert code == 0, proxy.log()
    assert "backend still running" in proxy.log()
    assert gone(backend)


@pytest.mark.parametrize("workers", WORKERS)
async def test_a_backend_that_exits_stops_the_proxy_with_one_line(
    start_supervised: Start, workers: int, tmp_path: Path
) -> None:
    proxy = await start_supervised(env={"BACKEND_EXIT_AFTER": "1.0"}, workers=workers)
    await proxy.wait_healthy()

    code = await asyncio.wait_for(proxy.process.wait(), timeout=10)

    assert code != 0
    lines = [line for line in proxy.log().splitlines() if "exited on its own" in line]
    assert len(lines) == 1, proxy.log()
    assert "code 3" in lines[0]
    assert "backend.py" in lines[0]


@pytest.mark.parametrize("workers", WORKERS)
async def test_a_backend_that_never_answers_fails_the_start_within_the_bound(
    start_supervised: Start,
    workers: int,
) -> None:
    never = [sys.executable, "-c", "import time; time.sleep(60)"]
    settings = {"upstream.start_timeout_seconds": 1.0}
    proxy = await start_supervised(settings, backend=never, workers=workers)
    started = time.monotonic()

    code = await asyncio.wait_for(proxy.process.wait(), timeout=10)

    assert code != 0
    assert time.monotonic() - started < 8
    lines = [line for line in proxy.log().splitlines() if "did not answer" in line]
    assert len(lines) == 1, proxy.log()
    assert "time.sleep(60)" in lines[0]
    assert "within 1 s" in lines[0]


async def test_databricks_app_port_is_where_the_proxy_listens(
    tmp_path: Path, legacy_backend: FakeLegacyBackend
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        toml_for({"upstream.url": legacy_backend.url, "cache.volume.path": str(tmp_path / "v")})
    )
    port = free_port()
    proxy = await spawn_proxy(
        tmp_path,
        ["serve", "--config", str(config)],
        port=port,
        # The platform's host default (0.0.0.0, checked through check-config below) gives way to
        # an explicit one: a test's servers listen on loopback only.
        env={"DATABRICKS_APP_PORT": str(port), "TTS_PROXY_SERVER_HOST": "127.0.0.1"},
    )
    try:
        await proxy.wait_healthy()
        assert f"127.0.0.1:{port}" in proxy.log()
    finally:
        await proxy.stop()


def check_config(tmp_path: Path, settings: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """check-config's TOML output for a file of `settings` and environment `env`."""
    config = tmp_path / "proxy.toml"
    config.write_text(toml_for({"cache.volume.path": str(tmp_path / "v"), **settings}))
    result = subprocess.run(
        [*PROXY_MODULE, "check-config", "--config", str(config)],
        cwd=tmp_path,
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_check_config_names_the_platform_port_as_the_source(tmp_path: Path) -> None:
    out = check_config(tmp_path, {}, {"DATABRICKS_APP_PORT": "8123"})

    assert "port = 8123  # platform (DATABRICKS_APP_PORT)" in out
    assert 'host = "0.0.0.0"  # platform (DATABRICKS_APP_PORT)' in out
    assert "shutdown_timeout_seconds = 30.0  # default" in out
    assert "  # file" in out  # cache.volume.path


def test_the_file_and_environment_win_over_the_platform_port(tmp_path: Path) -> None:
    env = {"DATABRICKS_APP_PORT": "8123", "TTS_PROXY_SERVER_HOST": "127.0.0.1"}

    out = check_config(tmp_path, {"server.port": 9000}, env)

    assert "port = 9000  # file" in out
    assert 'host = "127.0.0.1"  # environment (TTS_PROXY_SERVER_HOST)' in out
    assert "8123" not in out


def test_a_bad_platform_port_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(toml_for({"cache.volume.path": str(tmp_path / "v")}))
    result = subprocess.run(
        [*PROXY_MODULE, "check-config", "--config", str(config)],
        cwd=tmp_path,
        env=clean_environment(DATABRICKS_APP_PORT="eighty"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: DATABRICKS_APP_PORT: expected a port number, got 'eighty'"
    ]
