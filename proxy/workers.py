"""`serve --workers N`: N processes on one port (SO_REUSEPORT), supervised by their parent."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import wait as wait_for_exit
from multiprocessing.context import ForkProcess
from types import FrameType
from typing import TYPE_CHECKING, cast

from aiohttp import web

from proxy.config import ConfigError, Settings
from proxy.event_loop import new_event_loop
from proxy.listen import SERVE_PORT, check_free
from proxy.supervisor import (
    BackendFailed,
    ParentBackend,
    for_workers,
    loopback_port,
)

if TYPE_CHECKING:
    from proxy.fleet.group import WorkerGroup

EXIT_WORKER_FAILED = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Beyond shutdown_timeout_seconds, how long the parent waits for a draining worker before SIGKILL.
WORKER_EXIT_MARGIN_SECONDS = 10.0
PR_SET_PDEATHSIG = 1

log = logging.getLogger("proxy.workers")


def serve_workers(settings: Settings, count: int) -> int:
    """Run `count` worker processes on one port and supervise them until they stop."""
    if settings.server.port == 0:
        raise ConfigError("server.port", "--workers needs a fixed port, not 0")
    # The workers bind with SO_REUSEPORT, each on its own: a port another program holds must
    # stop the group here, as one line, not as N workers failing one after the other.
    check_free(settings.server.host, settings.server.port, *SERVE_PORT, reuse_port=True)
    from proxy.app import create_app
    from proxy.fleet.group import WorkerGroup
    from proxy.heap import single_arena

    backend_port = loopback_port() if settings.upstream.command else 0
    if backend_port:
        settings = for_workers(settings, backend_port)
    single_arena()  # before the fork: every worker inherits it
    create_app(settings)  # a configuration the app refuses stops here, with exit code 2
    # The workers' private folder: their sockets, to reach one another (proxy/fleet/group.py).
    group = WorkerGroup.create(count)
    context = multiprocessing.get_context("fork")
    parent = os.getpid()
    workers: list[ForkProcess] = []
    received: list[int] = []
    backend: ParentBackend | None = None
    stop_by = [float("inf")]  # when the backend must be gone: upstream.stop_seconds after a signal

    def forward(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != parent:  # a worker between fork and its own handlers
            return
        if not received:
            stop_by[0] = time.monotonic() + settings.upstream.stop_seconds
        received.append(signum)
        _signal_workers(workers, signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        if backend_port:
            # One backend for all workers, the parent's child: the workers only relay to it.
            try:
                upstream = settings.upstream
                backend = ParentBackend(
                    upstream.command,
                    backend_port,
                    upstream.start_timeout_seconds,
                    upstream.command_env_unset,
                )
            except BackendFailed as exc:
                print(f"tts-cache-proxy: {exc}", file=sys.stderr, flush=True)
                return EXIT_WORKER_FAILED
        for index in range(count):
            worker = context.Process(
                target=_worker_main,
                args=(settings, parent, group),
                name=f"tts-cache-proxy-worker-{index}",
            )
            # Blocked across the fork: the worker takes pending signals once its loop handles them.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                worker.start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            workers.append(worker)
        if received:
            _signal_workers(workers, received[0])
        log.info(
            "%d workers on port %d: pids %s",
            count,
            settings.server.port,
            " ".join(str(w.pid) for w in workers),
        )
        grace = settings.server.shutdown_timeout_seconds + WORKER_EXIT_MARGIN_SECONDS
        if backend is not None:  # the workers' drain, then the backend's share of the stop
            grace = settings.server.shutdown_timeout_seconds + 0.5
        return _supervise(workers, received, grace, backend)
    finally:
        _signal_workers(workers, signal.SIGKILL)
        for worker in workers:
            worker.join()
        if backend is not None:
            left = min(stop_by[0], time.monotonic() + settings.upstream.stop_seconds)
            backend.stop(received[0] if received else signal.SIGTERM, left - time.monotonic())
        group.remove()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _supervise(
    workers: list[ForkProcess],
    received: list[int],
    grace: float,
    backend: ParentBackend | None = None,
) -> int:
    """Wait for the workers; one that exits unasked, or a failed backend, stops the others."""
    running = {worker.sentinel: worker for worker in workers}
    failed = False
    deadline: float | None = None
    while running:
        failure = backend.failure() if backend is not None and not received else ""
        if failure:
            print(f"tts-cache-proxy: {failure}", file=sys.stderr, flush=True)
            failed = True
            received.append(signal.SIGTERM)
            _signal_workers(list(running.values()), signal.SIGTERM)
        if received and deadline is None:
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() >= deadline:
            log.error("workers still running %.0f s after the stop signal: killed", grace)
            _signal_workers(list(running.values()), signal.SIGKILL)
            failed = True
            deadline = float("inf")
        # A bounded wait, so a signal received meanwhile starts the drain deadline.
        for sentinel in wait_for_exit(list(running), timeout=0.5):
            worker = running.pop(cast(int, sentinel))
            worker.join()
            if worker.exitcode != 0:
                failed = True
            if not received:
                log.error(
                    "worker %s exited unexpectedly (exit code %s): stopping the others",
                    worker.pid,
                    worker.exitcode,
                )
                failed = True
                received.append(signal.SIGTERM)
                _signal_workers(list(running.values()), signal.SIGTERM)
    return EXIT_WORKER_FAILED if failed else 0


def _signal_workers(workers: Sequence[ForkProcess], signum: int) -> None:
    for worker in workers:
        if worker.pid is None or worker.exitcode is not None:
            continue
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass


def _worker_main(settings: Settings, parent: int, group: WorkerGroup) -> None:
    """One worker: the single-process server, on a port it shares with its siblings."""
    from proxy.access_log import access_log_options
    from proxy.app import create_app, runner_shutdown_timeout

    _die_with_parent(parent)
    loop = new_event_loop()
    stopping = False

    def stop_once() -> None:
        # The terminal's Ctrl-C reaches the workers and the parent, which forwards it: a second
        # signal must not cut the drain short.
        nonlocal stopping
        if not stopping:
            stopping = True
            raise web.GracefulExit()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop_once)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    web.run_app(
        create_app(settings, group=group),
        host=settings.server.host,
        port=settings.server.port,
        shutdown_timeout=runner_shutdown_timeout(settings.server.shutdown_timeout_seconds),
        **access_log_options(settings),
        loop=loop,
        handle_signals=False,
        reuse_port=True,
        print=lambda message: print(message, file=sys.stderr, flush=True),
    )


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this worker when the parent dies, so no worker outlives it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
