"""`serve -- CMD`: the legacy backend as a child on a loopback port, the proxy in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Final

from aiohttp import web

from proxy.config import ConfigError, Settings
from proxy.listen import SERVE_PORT, listening

EXIT_BACKEND_FAILED = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Of upstream.stop_seconds, at least this much is left for the backend's own stop (or half).
BACKEND_STOP_SECONDS = 3.0
PROBE_INTERVAL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1
# In the backend's arguments, replaced by its loopback port (the platform substitutes only
# $DATABRICKS_APP_PORT, which is the proxy's own).
BACKEND_PORT_PLACEHOLDER: Final = "{backend_port}"
# What Databricks Apps (and `databricks apps run-local`) set to the app's port and address for
# the frameworks it knows. The backend inherits the environment, so each of them names the
# backend's loopback port and address instead: a backend that reads any of them (uvicorn reads
# UVICORN_PORT and UVICORN_HOST) listens where the proxy expects, never on the proxy's port.
BACKEND_PORT_VARIABLES: Final = (
    "DATABRICKS_APP_PORT",
    "PORT",
    "UVICORN_PORT",
    "FLASK_RUN_PORT",
    "STREAMLIT_SERVER_PORT",
    "GRADIO_SERVER_PORT",
)
BACKEND_HOST_VARIABLES: Final = (
    "UVICORN_HOST",
    "FLASK_RUN_HOST",
    "STREAMLIT_SERVER_ADDRESS",
    "GRADIO_SERVER_NAME",
)
BACKEND_HOST: Final = "127.0.0.1"

log = logging.getLogger("proxy.supervisor")


def loopback_port() -> int:
    """A loopback port nothing listens on right now, for the backend."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def backend_environment(port: int, unset: Iterable[str] = ()) -> dict[str, str]:
    """The proxy's environment for the backend: its port and address named, `unset` left out."""
    hidden = set(unset)
    env = {name: value for name, value in os.environ.items() if name not in hidden}
    env.update(dict.fromkeys(BACKEND_PORT_VARIABLES, str(port)))
    env.update(dict.fromkeys(BACKEND_HOST_VARIABLES, BACKEND_HOST))
    return env


def backend_argv(command: Sequence[str], port: int) -> list[str]:
    """The backend's arguments with {backend_port} replaced by its loopback port."""
    return [argument.replace(BACKEND_PORT_PLACEHOLDER, str(port)) for argument in command]


def check_backend_command(settings: Settings) -> None:
    """ConfigError when an argument names the proxy's own port: the backend would collide."""
    port = settings.server.port
    if not port:
        return
    # "8000", "--port=8000", "0.0.0.0:8000": what a platform-substituted $DATABRICKS_APP_PORT
    # leaves in a command written for the app alone.
    own_port = re.compile(rf"(?:.*[=:])?{port}")
    for argument in settings.upstream.command:
        if own_port.fullmatch(argument):
            raise ConfigError(
                "upstream.command",
                f"argument {argument!r} is the proxy's own port {port}: drop it (the backend "
                f"gets its port as DATABRICKS_APP_PORT, PORT and UVICORN_PORT) "
                f"or write {BACKEND_PORT_PLACEHOLDER}",
            )


def with_backend_url(settings: Settings, port: int) -> Settings:
    """The settings with upstream.url on the backend's loopback port."""
    upstream = dataclasses.replace(settings.upstream, url=f"http://127.0.0.1:{port}")
    return dataclasses.replace(settings, upstream=upstream)


def drain_seconds(settings: Settings) -> float:
    """The proxy's drain: within upstream.stop_seconds, leaving the backend its share."""
    stop = settings.upstream.stop_seconds
    backend_share = min(BACKEND_STOP_SECONDS, stop / 2)
    return min(settings.server.shutdown_timeout_seconds, stop - backend_share)


def _die_with_parent() -> None:
    """In the child before exec: Linux SIGKILLs the backend if the proxy dies without a stop."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def start_backend(
    command: Sequence[str], port: int, unset_env: Iterable[str] = ()
) -> asyncio.subprocess.Process:
    """Start the backend (no shell) on `port`: its arguments and environment name it."""
    try:
        # Its own session: a terminal's Ctrl-C reaches the proxy only, which stops the backend
        # after its drain; its stdout and stderr are the proxy's own.
        return await asyncio.create_subprocess_exec(
            *backend_argv(command, port),
            stdin=asyncio.subprocess.DEVNULL,
            env=backend_environment(port, unset_env),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except OSError as exc:
        raise BackendFailed(f"backend `{shlex.join(command)}` could not start: {exc}") from None


class BackendFailed(Exception):
    """The backend did not start, did not answer in time, or exited on its own."""


async def wait_answering(port: int, within: float, backend: asyncio.subprocess.Process) -> None:
    """Return once the backend accepts connections on `port`; BackendFailed past `within`."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if backend.returncode is not None:
            return  # the caller sees the exit
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise BackendFailed(f"did not answer on 127.0.0.1:{port} within {within:g} s")


async def stop_backend(backend: asyncio.subprocess.Process, signum: int, within: float) -> None:
    """Send `signum`, wait up to `within` seconds, then SIGKILL."""
    if backend.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        backend.send_signal(signum)
    try:
        await asyncio.wait_for(backend.wait(), timeout=max(within, 0.1))
    except TimeoutError:
        log.error(
            "backend still running %.1f s after %s: killed", within, signal.Signals(signum).name
        )
        with contextlib.suppress(ProcessLookupError):
            backend.kill()
        await backend.wait()


async def serve_with_backend(settings: Settings) -> int:
    """Run the proxy and upstream.command until a stop signal or the backend's failure."""
    from proxy.access_log import access_log_options
    from proxy.app import create_app, runner_shutdown_timeout

    command = settings.upstream.command
    port = loopback_port()
    settings = for_workers(settings, port)  # the app's drain is the runner's: within stop_seconds
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        shutdown_timeout=runner_shutdown_timeout(settings.server.shutdown_timeout_seconds),
        **access_log_options(settings),
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    received: list[int] = []
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if not received:  # a second signal must not cut the drain short
            received.append(signum)
            stopping.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    backend: asyncio.subprocess.Process | None = None
    failure = ""
    try:
        # The proxy listens at once: /_proxy/health is 200, /_proxy/ready 503 until the backend
        # answers (its upstream check), and requests meanwhile get the proxy's 502.
        host, listen = settings.server.host, settings.server.port
        with listening(host, listen, *SERVE_PORT):
            await web.TCPSite(runner, host, listen).start()
        backend = await start_backend(command, port, settings.upstream.command_env_unset)
        log.info(
            "proxy on %s:%d; backend `%s` (pid %d) on 127.0.0.1:%d",
            *(host, listen, shlex.join(command), backend.pid, port),
        )
        failure = await _watch(settings, backend, port, stopping)
    except BackendFailed as exc:
        failure = str(exc)
    finally:
        stop_started = time.monotonic()
        if failure:
            print(f"tts-cache-proxy: {failure}", file=sys.stderr, flush=True)
        # Stop accepting and drain the requests in flight, then stop the backend: signalled
        # first, it would cut the requests the proxy still relays to it.
        await runner.cleanup()
        if backend is not None:
            left = settings.upstream.stop_seconds - (time.monotonic() - stop_started)
            await stop_backend(backend, received[0] if received else signal.SIGTERM, left)
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    return EXIT_BACKEND_FAILED if failure else 0


async def _watch(
    settings: Settings, backend: asyncio.subprocess.Process, port: int, stopping: asyncio.Event
) -> str:
    """Wait for a stop signal (""), or say how the backend failed."""
    name = f"backend `{shlex.join(settings.upstream.command)}`"
    exited = asyncio.create_task(backend.wait())
    signalled = asyncio.create_task(stopping.wait())
    answering = asyncio.create_task(
        wait_answering(port, settings.upstream.start_timeout_seconds, backend)
    )
    pending = {exited, signalled, answering}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if signalled in done:
                return ""
            if exited in done:
                return f"{name} exited on its own with code {backend.returncode}: proxy stopping"
            if answering in done:
                error = answering.exception()
                if error is not None:
                    return f"{name} {error}: proxy stopping"
                if backend.returncode is None:
                    log.info("%s answers on 127.0.0.1:%d", name, port)
    finally:
        for task in pending:
            task.cancel()


class ParentBackend:
    """The backend of `serve --workers N -- CMD`: one for all workers, started by the parent."""

    # Blocking calls on purpose: the parent runs no event loop, only waits for its children.

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        start_timeout: float,
        unset_env: Iterable[str] = (),
    ) -> None:
        self.name = f"backend `{shlex.join(command)}`"
        self.port = port
        self.deadline = time.monotonic() + start_timeout
        self.start_timeout = start_timeout
        self.answered = False
        try:
            self.process = subprocess.Popen(
                backend_argv(command, port),
                stdin=subprocess.DEVNULL,
                env=backend_environment(port, unset_env),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise BackendFailed(f"{self.name} could not start: {exc}") from None

    def failure(self) -> str:
        """ "" while the backend runs (answering, or still within its start bound); else why not."""
        code = self.process.poll()
        if code is not None:
            return f"{self.name} exited on its own with code {code}: proxy stopping"
        if self.answered:
            return ""
        try:
            socket.create_connection(
                ("127.0.0.1", self.port), timeout=PROBE_INTERVAL_SECONDS
            ).close()
        except OSError:
            if time.monotonic() < self.deadline:
                return ""
            return (
                f"{self.name} did not answer on 127.0.0.1:{self.port} "
                f"within {self.start_timeout:g} s: proxy stopping"
            )
        self.answered = True
        log.info("%s answers on 127.0.0.1:%d", self.name, self.port)
        return ""

    def stop(self, signum: int, within: float) -> None:
        """Send `signum`, wait up to `within` seconds, then SIGKILL."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=max(within, 0.1))
        except subprocess.TimeoutExpired:
            log.error("backend still running %.1f s after the stop signal: killed", within)
            self.process.kill()
            self.process.wait()


def for_workers(settings: Settings, port: int) -> Settings:
    """Settings in front of a supervised backend: upstream.url on its port, the drain within
    upstream.stop_seconds (leaving the backend its share)."""
    settings = with_backend_url(settings, port)
    server = dataclasses.replace(settings.server, shutdown_timeout_seconds=drain_seconds(settings))
    return dataclasses.replace(settings, server=server)
