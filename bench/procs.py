"""Child processes of the harness: each in its own session, every one stopped at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

STOP_GRACE_SECONDS = 5.0


class StartFailed(Exception):
    """A child did not become ready; the message carries the end of its log."""


@dataclass
class Child:
    """One process the harness started, leader of its own process group."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """True until the process has exited."""
        return self.process.returncode is None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines the process wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """Every process the harness starts; `stop_all` ends them, group by group, whatever happened."""

    def __init__(self, folder: Path, *, pin: bool, anywhere: str | None = None) -> None:
        self.folder = folder
        self.pin = pin and shutil.which("taskset") is not None
        # The CPU list for children not pinned anywhere in particular (the harness itself is).
        self.anywhere = anywhere
        self._children: list[Child] = []

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cpus: str | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start `argv` in a new session, output to `{folder}/{name}.log`, pinned to `cpus`."""
        command = list(argv)
        cpus = cpus or self.anywhere
        if cpus is not None and self.pin:
            command = ["taskset", "-c", cpus, *command]
        log_path = self.folder / f"{name}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env) if env is not None else child_environment(),
                cwd=cwd,
                # Its own group: the terminal's Ctrl-C reaches only the harness, which stops it.
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self._children.append(child)
        return child

    async def stop(self, child: Child) -> None:
        """SIGTERM the child's process group, SIGKILL it after a grace period, reap it."""
        if child.running:
            _signal_group(child.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), STOP_GRACE_SECONDS)
            except TimeoutError:
                pass
        # Whatever is left in the group (nginx workers, proxy workers) goes too.
        _signal_group(child.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await child.process.wait()
        if child in self._children:
            self._children.remove(child)

    async def stop_all(self) -> None:
        """Stop every child still known, newest first; survives cancellation of the caller."""
        while self._children:
            child = self._children[-1]
            try:
                await self.stop(child)
            except BaseException:
                _signal_group(child.pid, signal.SIGKILL)
                self._children.remove(child)
                raise

    def kill_all_now(self) -> None:
        """SIGKILL every known group at once (the last resort when the loop cannot run)."""
        for child in self._children:
            _signal_group(child.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def child_environment(**extra: str) -> dict[str, str]:
    """This environment without TTS_PROXY_* / DATABRICKS_* settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TTS_PROXY_", "DATABRICKS_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def wait_ready_file(child: Child, path: Path, within: float = 20.0) -> dict[str, Any]:
    """The JSON a child writes to `path` once it listens."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not child.running:
            break
        ports = _read_ready(path)
        if ports is not None:
            return ports
        await asyncio.sleep(0.05)
    raise StartFailed(f"{child.name} did not start:\n{child.log_tail()}")


def _read_ready(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


async def wait_http(child: Child, url: str, within: float = 20.0, ok_only: bool = True) -> None:
    """Poll `url` with GET until it answers (200, unless `ok_only` is False)."""
    deadline = time.monotonic() + within
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline and child.running:
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status == 200 or not ok_only:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise StartFailed(f"{child.name} did not answer {url}:\n{child.log_tail()}")


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` from /proc, in bytes (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def listening_pids(pids: Sequence[int], port: int) -> list[int]:
    """Those of `pids` holding a listening IPv4 TCP socket on `port`."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            listening.add(f"socket:[{fields[9]}]")
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in listening:
                        found.append(pid)
                        break
    return found


async def run_command(
    argv: Sequence[str], *, limit_seconds: float, cpus: str | None = None, pin: bool = False
) -> tuple[int, str, str]:
    """Run a short command to completion in its own group, killed on timeout or cancellation."""
    command = list(argv)
    if cpus is not None and pin and shutil.which("taskset"):
        command = ["taskset", "-c", cpus, *command]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit_seconds)
    finally:
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                await process.wait()
    return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
