"""The peers: each started as its own process on 127.0.0.1, in front of one shared fake backend."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import (
    Child,
    Children,
    StartFailed,
    child_environment,
    children_of,
    free_port,
    listening_pids,
    wait_http,
    wait_ready_file,
)
from bench.workload import SPEAK_PATH
from proxy.config import to_toml

REPO = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"


@dataclass(frozen=True)
class CpuPlan:
    """Where processes run: servers under test on one CPU, load generators on another."""

    server: str | None
    loadgen: str | None
    anywhere: str | None

    @property
    def pinned(self) -> bool:
        """True when servers and load generators are kept apart."""
        return self.server is not None

    @classmethod
    def detect(cls, enabled: bool) -> CpuPlan:
        """The first CPU for servers and the next for load, when there are at least two."""
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2:
            return cls(None, None, None)
        return cls(str(cpus[0]), str(cpus[1]), ",".join(str(c) for c in cpus))

    def describe(self) -> str:
        """One line for the report."""
        if not self.pinned:
            return "not pinned: load generators and servers share every CPU"
        return (
            f"servers under test on CPU {self.server} (2-worker runs on every CPU), "
            f"load generators (wrk, the Python client) on CPU {self.loadgen}, "
            f"the fake backend and the Files API emulator unpinned"
        )


@dataclass
class Peer:
    """A server a scenario sends load to."""

    key: str
    label: str
    kind: str
    url: str
    child: Child
    workers: int = 1
    settings: dict[str, Any] = field(default_factory=dict)
    # Processes that serve only this peer (the seed-style peer's Files API emulator).
    helpers: list[Child] = field(default_factory=list)
    # A cheap GET the peer answers itself, to open connections before a burst.
    ping_path: str = "/_proxy/health"
    # What its rows should say about how it ran (a setup that did not go as planned).
    notes: list[str] = field(default_factory=list)

    @property
    def speak_url(self) -> str:
        """Where speak calls go."""
        return self.url + SPEAK_PATH

    @property
    def pid(self) -> int:
        """The process under test (the parent, with several workers)."""
        return self.child.pid


@dataclass(frozen=True)
class Unavailable:
    """A peer that could not run here, and why."""

    key: str
    label: str
    reason: str
    # True when the peer should have run and failed to: its rows are invalid, not unavailable.
    broken: bool = False


@dataclass
class Backend:
    """The fake legacy backend and its control port."""

    child: Child
    url: str
    control_url: str

    async def calls(self) -> int:
        """Speak calls the backend has answered so far."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.control_url}/calls") as response,
        ):
            data = await response.json()
            return int(data["speak"])

    async def behave(self, **fields: Any) -> None:
        """Change how the next speak calls are answered (SpeakBehaviour fields)."""
        async with (
            aiohttp.ClientSession() as session,
            session.put(f"{self.control_url}/behaviour", json=fields) as response,
        ):
            if response.status != 200:
                raise RuntimeError(f"backend refused behaviour {fields}: {await response.text()}")


class Lab:
    """Starts peers as child processes; `Children.stop_all` ends them."""

    def __init__(self, children: Children, folder: Path, cpus: CpuPlan) -> None:
        self.children = children
        self.folder = folder
        self.cpus = cpus

    async def backend(self) -> Backend:
        """The fake legacy backend, on any CPU."""
        ready = self.folder / "backend.ready"
        child = await self.python("backend", "bench.backend", "--ready-file", str(ready))
        ports = await wait_ready_file(child, ready)
        return Backend(
            child,
            f"http://127.0.0.1:{ports['port']}",
            f"http://127.0.0.1:{ports['control_port']}",
        )

    async def ceiling(self, size: int) -> Peer:
        """The bare aiohttp handler answering `size` prebuilt bytes."""
        name = f"ceiling-{size}"
        ready = self.folder / f"{name}.ready"
        child = await self.python(
            name,
            "bench.ceiling",
            "--ready-file",
            str(ready),
            "--size",
            str(size),
            cpus=self.cpus.server,
        )
        ports = await wait_ready_file(child, ready)
        return Peer("ceiling", "ceiling", "ceiling", f"http://127.0.0.1:{ports['port']}", child)

    async def nginx(self, backend: Backend) -> Peer | Unavailable:
        """nginx with proxy_cache in front of the backend, one worker."""
        label = "nginx proxy_cache"
        binary = nginx_binary()
        if binary is None:
            return Unavailable("nginx", label, "nginx is not installed")
        prefix = self.folder / "nginx"
        port = free_port()
        backend_port = backend.url.rsplit(":", 1)[1]
        config = prefix / "nginx.conf"
        for sub in (
            "cache",
            "tmp/client_body",
            "tmp/proxy",
            "tmp/fastcgi",
            "tmp/uwsgi",
            "tmp/scgi",
        ):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        user_directive = ""
        if os.geteuid() == 0:
            # The master runs as root; its worker, as nobody, must own what it writes.
            user_directive = "user nobody nogroup;"
            chown_tree(prefix, "nobody", "nogroup")
        text = NGINX_TEMPLATE.read_text()
        for name, value in {
            "user_directive": user_directive,
            "prefix": str(prefix),
            "port": str(port),
            "backend_port": backend_port,
        }.items():
            text = text.replace("{{" + name + "}}", value)
        config.write_text(text)
        child = await self.children.spawn(
            "nginx",
            [binary, "-p", f"{prefix}/", "-c", str(config), "-g", "daemon off;"],
            cpus=self.cpus.server,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_http(child, f"{url}/_bench/ping", ok_only=False)
        except StartFailed as exc:
            await self.children.stop(child)
            return Unavailable("nginx", label, str(exc).splitlines()[-1])
        return Peer("nginx", label, "nginx", url, child, ping_path="/_bench/ping")

    def direct(self, backend: Backend) -> Peer:
        """The backend itself, with no proxy."""
        return Peer("direct", "direct", "direct", backend.url, backend.child, ping_path="/echo")

    async def ours(
        self,
        key: str,
        label: str,
        backend: Backend,
        *,
        workers: int = 1,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> Peer:
        """`python -m proxy serve` in front of the backend, its Volume in its own folder."""
        port = free_port()
        values: dict[str, Any] = {
            "server.host": "127.0.0.1",
            "server.port": port,
            "server.access_log": False,
            "server.shutdown_timeout_seconds": 2.0,
            "upstream.url": backend.url,
            "cache.volume.path": str(self.folder / f"volume-{key}"),
        }
        values.update(settings or {})
        config = self.folder / f"{key}.toml"
        config.write_text(to_toml(_nested(values)))
        argv = ["serve", "--config", str(config)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        child = await self.python(
            key,
            "proxy",
            *argv,
            env=child_environment(**(env or {})),
            # Several workers need every CPU; one stays on the server CPU like every peer.
            cpus=self.cpus.server if workers == 1 else self.cpus.anywhere,
        )
        url = f"http://127.0.0.1:{port}"
        await wait_http(child, f"{url}/_proxy/health")
        if workers > 1:
            await _wait_listeners(child, port, workers)
        return Peer(key, label, "ours", url, child, workers=workers, settings=values)

    async def stop(self, peer: Peer) -> None:
        """Stop the peer's process and its helpers."""
        await self.children.stop(peer.child)
        for helper in peer.helpers:
            await self.children.stop(helper)

    async def python(
        self,
        name: str,
        module: str,
        *args: str,
        env: dict[str, str] | None = None,
        cpus: str | None = None,
    ) -> Child:
        return await self.children.spawn(
            name, [sys.executable, "-m", module, *args], env=env, cpus=cpus, cwd=REPO
        )


def nginx_binary() -> str | None:
    """nginx's path (Debian puts it in /usr/sbin, outside a user's PATH), or None."""
    return shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


async def _wait_listeners(child: Child, port: int, workers: int, within: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline and child.running:
        if len(listening_pids(children_of(child.pid), port)) >= workers:
            return
        await asyncio.sleep(0.05)
    raise StartFailed(f"{child.name}: {workers} workers did not all listen:\n{child.log_tail()}")


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def chown_tree(root: Path, user: str, group: str) -> None:
    """Give `root`'s contents to `user`:`group` and open `root` to them (nginx's worker)."""
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            with contextlib.suppress(OSError):
                os.chown(os.path.join(folder, name), uid, gid)
    root.chmod(0o755)
