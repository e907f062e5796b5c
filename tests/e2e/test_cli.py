"""The command line as a user runs it: `python -m proxy` and the `tts-cache-proxy` script."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from proxy import __version__
from tests.conftest import PROXY_MODULE, clean_environment, free_port, toml_for
from tests.fakes import FakeLegacyBackend

if TYPE_CHECKING:
    from tests.conftest import StartProxy

SCRIPT = shutil.which("tts-cache-proxy", path=str(Path(sys.prefix) / "bin"))
CONSOLE_SCRIPT: tuple[str, ...] = (SCRIPT,) if SCRIPT else ()
COMMANDS = [
    pytest.param(PROXY_MODULE, id="python-m-proxy"),
    pytest.param(
        CONSOLE_SCRIPT,
        id="console-script",
        marks=pytest.mark.skipif(not SCRIPT, reason="tts-cache-proxy is not installed"),
    ),
]
SECRET = "s3cret-admin-token-of-32-characters"


def run(
    command: Sequence[str],
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion in `cwd` with a clean environment plus `env`."""
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=clean_environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_config(tmp_path: Path, settings: Mapping[str, Any]) -> Path:
    """A TOML config under tmp_path for dotted `settings`."""
    path = tmp_path / "proxy.toml"
    path.write_text(toml_for(settings))
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_version_prints_the_package_version(command: tuple[str, ...], tmp_path: Path) -> None:
    result = run(command, "--version", cwd=tmp_path)

    assert result.returncode == 0
    assert result.stdout.strip() == f"tts-cache-proxy {__version__}"


def test_check_config_prints_the_effective_settings_with_secrets_redacted(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path,
        {
            "server.port": 9123,
            "upstream.url": "http://backend.internal:8000",
            "admin.token": SECRET,
            "cache.volume.path": str(tmp_path / "volume"),
        },
    )

    result = run(PROXY_MODULE, "check-config", "--config", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout
    assert 'token = "***"' in result.stdout
    assert "port = 9123" in result.stdout
    assert 'url = "http://backend.internal:8000"' in result.stdout
    # Settings the file leaves out are printed with their defaults.
    assert 'default_voice = "af_nicole"' in result.stdout
    assert 'lookup_via_index = "when-complete"  # default' in result.stdout


def test_check_config_json_is_machine_readable(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"admin.token": SECRET, "server.port": 9124})

    result = run(PROXY_MODULE, "check-config", "--json", "--config", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    tree = json.loads(result.stdout)
    assert tree["admin"]["token"] == "***"
    assert tree["server"]["port"] == 9124
    assert SECRET not in result.stdout


def test_environment_overrides_take_effect_over_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"server.port": 9125, "tts.default_voice": "af_nicole"})
    env = {
        "TTS_PROXY_SERVER_PORT": "9555",
        "TTS_PROXY_TTS_DEFAULT_VOICE": "af_bella",
        "TTS_PROXY_ADMIN_TOKEN": SECRET,
    }

    result = run(PROXY_MODULE, "check-config", "--config", str(config), cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert "port = 9555" in result.stdout
    assert "port = 9125" not in result.stdout
    assert 'default_voice = "af_bella"' in result.stdout
    assert SECRET not in result.stdout


CONFIG_ERRORS = [
    pytest.param({"server.colour": "blue"}, {}, "server.colour", id="unknown-key"),
    pytest.param({"server.port": "abc"}, {}, "server.port", id="wrong-type"),
    pytest.param({"upstream.url": "ftp://x"}, {}, "upstream.url", id="bad-url"),
    pytest.param({}, {"TTS_PROXY_SERVER_PORT": "abc"}, "server.port", id="bad-env-value"),
    pytest.param(
        {}, {"TTS_PROXY_SERVER_COLOUR": "blue"}, "TTS_PROXY_SERVER_COLOUR", id="unknown-env"
    ),
]


@pytest.mark.parametrize("subcommand", ["check-config", "serve"])
@pytest.mark.parametrize(("settings", "env", "key"), CONFIG_ERRORS)
def test_a_config_error_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, subcommand: str, settings: dict[str, Any], env: dict[str, str], key: str
) -> None:
    config = write_config(tmp_path, {"server.port": free_port(), **settings})

    result = run(PROXY_MODULE, subcommand, "--config", str(config), cwd=tmp_path, env=env)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"config error: {key}: "), lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_config_file_exits_2_naming_it(command: tuple[str, ...], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"

    result = run(command, "serve", "--config", str(missing), cwd=tmp_path)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: --config: ")
    assert str(missing) in lines[0]


@pytest.mark.parametrize("command", COMMANDS)
async def test_serve_answers_health_with_the_version(
    command: tuple[str, ...], start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_proxy({"upstream.url": legacy_backend.url}, command=command)

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}/_proxy/health") as response,
    ):
        assert response.status == 200
        assert (await response.json()) == {"status": "ok", "version": __version__}
    assert sum(legacy_backend.calls.values()) == 0


async def test_serve_listens_on_the_port_from_the_environment(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    file_port, env_port = free_port(), free_port()
    proxy = await start_proxy(
        {"upstream.url": legacy_backend.url, "server.port": file_port},
        env={"TTS_PROXY_SERVER_PORT": str(env_port)},
        wait=False,
    )
    proxy.port = env_port

    await proxy.wait_healthy()

    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", file_port)


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Whether `check` comes true within `within` seconds, polled every 20 ms."""
    for _ in range(int(within / 0.02)):
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


async def _true(value: bool) -> bool:
    return value


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # Reset: the connection reached the backlog as the listening socket closed; not served.
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_sigterm_drains_the_request_in_flight_then_exits_0(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_proxy(
        {"upstream.url": legacy_backend.url, "server.shutdown_timeout_seconds": 10}
    )

    async with aiohttp.ClientSession() as session:

        async def slow_request() -> tuple[int, Any]:
            async with session.get(f"{proxy.url}/slow?delay=1.5") as response:
                return response.status, await response.json()

        in_flight = asyncio.create_task(slow_request())
        assert await eventually(lambda: _true(legacy_backend.calls["/slow"] == 1), 5), proxy.log()

        proxy.process.send_signal(signal.SIGTERM)
        # The listener closes at once; the request in flight goes on.
        refused = await eventually(lambda: _refused(proxy.port), 1.0)
        assert refused, "the proxy still accepts connections after SIGTERM"
        assert not in_flight.done()

        status, body = await asyncio.wait_for(in_flight, timeout=10)

    assert (status, body) == (200, {"slept": 1.5})
    assert legacy_backend.calls["/slow"] == 1
    assert await asyncio.wait_for(proxy.process.wait(), timeout=10) == 0, proxy.log()
    assert await _refused(proxy.port)


BUSY_PORT_RUNS = [
    pytest.param(("serve",), "server.port", id="serve"),
    pytest.param(("serve", "--workers", "2"), "server.port", id="serve-workers"),
    pytest.param(
        ("serve", "--", sys.executable, "-c", "import time; time.sleep(30)"),
        "server.port",
        id="serve-backend",
    ),
    pytest.param(("demo", "--port", "{busy}", "--backend-port", "{free}"), "--port", id="demo"),
    pytest.param(
        ("demo", "--port", "{free}", "--backend-port", "{busy}"),
        "--backend-port",
        id="demo-backend",
    ),
]


@pytest.mark.parametrize(("arguments", "key"), BUSY_PORT_RUNS)
def test_a_busy_port_exits_2_with_one_line_naming_the_address_and_the_key(
    tmp_path: Path, arguments: tuple[str, ...], key: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        config = write_config(tmp_path, {"server.port": busy, "server.host": "127.0.0.1"})
        given = [a.format(busy=busy, free=free_port()) for a in arguments]
        command, rest = given[0], given[1:]
        backend = rest.index("--") if "--" in rest else len(rest)
        rest[backend:backend] = ["--config", str(config)]

        result = run(PROXY_MODULE, command, *rest, cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"config error: {key}: cannot listen on 127.0.0.1:{busy}: ")
    assert "address already in use" in lines[0]


@pytest.mark.parametrize(
    ("name", "warned"), [("docker.toml", True), ("example.toml", False), ("default.toml", False)]
)
def test_check_config_warns_when_a_shipped_preset_would_believe_no_one(
    tmp_path: Path, name: str, warned: bool
) -> None:
    preset = Path(__file__).resolve().parents[2] / "config" / name

    result = run(PROXY_MODULE, "check-config", "--config", str(preset), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert ("identity.trusted_proxies trusts only loopback" in result.stderr) is warned


def test_help_names_every_command_with_what_it_does(tmp_path: Path) -> None:
    result = run(PROXY_MODULE, "--help", cwd=tmp_path)

    assert result.returncode == 0
    listed = {
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith("    ") and len(line.split()) > 1
    }
    assert {"serve", "check-config", "purge", "demo"} <= listed, result.stdout


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_with_an_event_stream_open_exits_within_the_shutdown_bound(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend, workers: int
) -> None:
    bound = 5.0
    proxy = await start_proxy(
        {"upstream.url": legacy_backend.url, "server.shutdown_timeout_seconds": bound},
        extra_args=["--workers", str(workers)] if workers > 1 else [],
    )
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{proxy.url}/sse?count=1000&interval=0.2")
        assert response.status == 200
        await response.content.readline()  # the stream is open and flowing

        started = asyncio.get_running_loop().time()
        proxy.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proxy.process.wait(), timeout=20)
        took = asyncio.get_running_loop().time() - started
        response.close()

    assert code == 0, proxy.log()
    # The bound, plus what a loaded machine needs to start the stop and exit: not a second bound.
    assert took < bound + 2.5, f"exited {took:.1f} s after SIGTERM\n{proxy.log()}"
