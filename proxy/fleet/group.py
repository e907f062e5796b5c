"""The workers of one `serve --workers N`: a private folder, one Unix socket per worker.

The parent creates the folder (mode 0700, so only this user reaches the sockets) before it forks
and removes it when it exits. Each worker serves a small internal aiohttp application on
`worker-<pid>.sock` there; a worker finds its siblings by listing the folder. Anything that has
to reach the other workers of the host (invalidations, the group's numbers, and later fills
joined across workers) is a route on that application (`SiblingServer.add_route`) and a call
through `Siblings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

SOCKET_PREFIX: Final = "worker-"
SOCKET_SUFFIX: Final = ".sock"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def process_name(token: str, pid: int) -> str:
    """How the fleet names a process: its group's random token and its pid."""
    return f"{token}-{pid}"


def new_token() -> str:
    """A random token for a group (or a lone process) of this host."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class WorkerGroup:
    """What every worker of one `serve --workers N` shares: the folder, the size, the token."""

    runtime_dir: Path
    size: int
    token: str

    @classmethod
    def create(cls, size: int) -> WorkerGroup:
        """A new group folder (mode 0700) under the temporary directory (TMPDIR)."""
        folder = Path(tempfile.mkdtemp(prefix="tts-cache-proxy-"))
        os.chmod(folder, 0o700)
        return cls(folder, size, new_token())

    def remove(self) -> None:
        """Delete the folder and any socket left in it (the parent, at exit)."""
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def socket_path(self, pid: int) -> Path:
        """Where the worker `pid` listens."""
        return self.runtime_dir / f"{SOCKET_PREFIX}{pid}{SOCKET_SUFFIX}"

    def name_of(self, pid: int) -> str:
        """The fleet's name for the worker `pid` of this group."""
        return process_name(self.token, pid)

    def sibling_pids(self, own: int) -> list[int]:
        """The pids of the other workers whose sockets are in the folder now."""
        pids: list[int] = []
        try:
            names = os.listdir(self.runtime_dir)
        except OSError:
            return pids
        for name in names:
            if name.startswith(SOCKET_PREFIX) and name.endswith(SOCKET_SUFFIX):
                middle = name[len(SOCKET_PREFIX) : -len(SOCKET_SUFFIX)]
                if middle.isdigit() and int(middle) != own:
                    pids.append(int(middle))
        return sorted(pids)


class SiblingServer:
    """This worker's internal application on its socket; routes are added before `start`."""

    def __init__(self, group: WorkerGroup, pid: int | None = None) -> None:
        self.group = group
        self.pid = os.getpid() if pid is None else pid
        self.app = web.Application()
        self._runner: web.AppRunner | None = None

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve `handler` to the siblings (before start)."""
        self.app.router.add_route(method, path, handler)

    async def start(self) -> None:
        """Listen on this worker's socket (mode 0600 in the 0700 folder)."""
        path = self.group.socket_path(self.pid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket a previous process of this pid left
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.UnixSite(runner, str(path))
        await site.start()
        os.chmod(path, 0o600)
        self._runner = runner

    async def aclose(self) -> None:
        """Stop listening and remove the socket."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.group.socket_path(self.pid).unlink()


@dataclass(frozen=True)
class SiblingAnswer:
    """One sibling's answer to a call: its JSON, or why there is none."""

    pid: int
    data: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        """True when the sibling answered 200 with JSON."""
        return not self.error


class Siblings:
    """Calls to the other workers of the group, all at once, each within a bound."""

    def __init__(self, group: WorkerGroup, pid: int | None = None) -> None:
        self.group = group
        self.pid = os.getpid() if pid is None else pid
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def pids(self) -> list[int]:
        """The siblings there are sockets for now."""
        return self.group.sibling_pids(self.pid)

    async def call_all(
        self, method: str, path: str, *, within: float, json: Any = None
    ) -> list[SiblingAnswer]:
        """`method path` on every sibling concurrently; each answer or error within `within`
        seconds."""
        pids = self.pids()
        if not pids:
            return []
        calls = [self._call(pid, method, path, within, json) for pid in pids]
        return list(await asyncio.gather(*calls))

    def session(self, pid: int) -> aiohttp.ClientSession:
        """A kept-alive client session to the sibling `pid` (its socket)."""
        session = self._sessions.get(pid)
        if session is None or session.closed:
            connector = aiohttp.UnixConnector(path=str(self.group.socket_path(pid)))
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            self._sessions[pid] = session
        return session

    async def aclose(self) -> None:
        """Close the sessions."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    async def _call(
        self, pid: int, method: str, path: str, within: float, body: Any
    ) -> SiblingAnswer:
        try:
            async with asyncio.timeout(within):
                session = self.session(pid)
                async with session.request(method, f"http://worker{path}", json=body) as response:
                    if response.status != 200:
                        return SiblingAnswer(pid, error=f"status {response.status}")
                    return SiblingAnswer(pid, await response.json())
        except TimeoutError:
            return SiblingAnswer(pid, error="no answer in time")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # A socket whose worker is gone (or going): refused, reset, or half an answer.
            await self._forget(pid)
            return SiblingAnswer(pid, error=type(exc).__name__)

    async def _forget(self, pid: int) -> None:
        session = self._sessions.pop(pid, None)
        if session is not None:
            await session.close()
