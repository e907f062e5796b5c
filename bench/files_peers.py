"""Peers whose Volume is the Files API emulator: seed-style, and the production replay's."""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.files_api import TOKEN, VOLUME
from bench.peers import Backend, Lab, Peer, Unavailable
from bench.procs import Child, StartFailed, wait_ready_file
from bench.workload import speak_call

FILES_API_LATENCY_SECONDS = 0.030


@dataclass
class FilesApi:
    """The Files API emulator and its control port."""

    child: Child
    url: str
    control_url: str

    async def counts(self) -> dict[str, Any]:
        """Calls so far by kind, the calls answered 429, the most calls at once."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.control_url}/counts") as response,
        ):
            data: dict[str, Any] = await response.json()
            return data


async def start_files_api(
    lab: Lab,
    name: str,
    *,
    latency: float = FILES_API_LATENCY_SECONDS,
    max_concurrent: int | None = None,
    max_per_second: int | None = None,
) -> FilesApi:
    """The Files API emulator in a process of its own, `latency` seconds added per call."""
    ready = lab.folder / f"{name}.ready"
    argv = ["--ready-file", str(ready), "--latency", str(latency)]
    if max_concurrent is not None:
        argv += ["--max-concurrent", str(max_concurrent)]
    if max_per_second is not None:
        argv += ["--max-per-second", str(max_per_second)]
    child = await lab.python(name, "bench.files_api", *argv)
    try:
        ports = await wait_ready_file(child, ready)
    except StartFailed:
        await lab.children.stop(child)
        raise
    return FilesApi(child, ports["url"], f"http://127.0.0.1:{ports['control_port']}")


async def on_files_api(
    lab: Lab,
    key: str,
    label: str,
    backend: Backend,
    files_api: FilesApi,
    *,
    settings: dict[str, Any],
    kind: str = "ours",
) -> Peer | Unavailable:
    """The proxy with its Volume behind `files_api`; unavailable when this code base has no
    Databricks tier, broken when a stored entry does not come back from the Volume."""
    reason = seed_style_missing()
    if reason is not None:
        return Unavailable(key, label, reason)
    peer: Peer | None = None
    try:
        peer = await lab.ours(
            key,
            label,
            backend,
            settings={
                "cache.volume.kind": "databricks",
                "cache.volume.path": VOLUME,
                **settings,
            },
            env={"DATABRICKS_HOST": files_api.url, "DATABRICKS_TOKEN": TOKEN},
        )
        peer.kind = kind
        peer.helpers.append(files_api.child)
        failure = await _volume_round_trip(peer, files_api)
    except StartFailed as exc:
        failure = f"did not start: {exc}"
    if failure is None and peer is not None:
        return peer
    if peer is not None:
        await lab.stop(peer)
    await lab.children.stop(files_api.child)
    return Unavailable(key, label, failure or "did not start", broken=True)


async def seed_style(lab: Lab, backend: Backend) -> Peer | Unavailable:
    """The proxy without its memory tier, its Volume behind the Files API emulator (30 ms)."""
    label = "seed-style"
    if (reason := seed_style_missing()) is not None:
        return Unavailable("seed-style", label, reason)
    try:
        files_api = await start_files_api(lab, "files-api")
    except StartFailed as exc:
        return Unavailable("seed-style", label, f"did not start: {exc}", broken=True)
    return await on_files_api(
        lab,
        "seed-style",
        label,
        backend,
        files_api,
        kind="seed-style",
        settings={
            "cache.memory.max_bytes": 0,
            # The legacy design had no limiter: the Files API's own limits are what would
            # cap it, and this emulator models its latency, not its budget.
            "cache.volume.max_concurrent_calls": 256,
            "cache.volume.max_calls_per_second": 100_000.0,
        },
    )


def seed_style_missing() -> str | None:
    """Why the seed-style peer cannot run with this code base, or None when it can."""
    if importlib.util.find_spec("proxy.storage.databricks") is None:
        return "proxy.storage.databricks does not exist yet"
    if importlib.util.find_spec("tests.fakes.files_api") is None:
        return "tests/fakes/files_api.py does not exist yet"
    try:
        from proxy.app import create_app
        from proxy.config import ConfigError, load_settings

        settings = load_settings(
            env={},
            overrides={"cache.volume.kind": "databricks", "cache.volume.path": VOLUME},
        )
        create_app(settings)
    except ConfigError as exc:
        return f"the proxy refuses cache.volume.kind = databricks ({exc.problem})"
    except Exception as exc:
        return f"the proxy cannot be built with a databricks Volume ({type(exc).__name__}: {exc})"
    return None


async def _volume_round_trip(peer: Peer, files_api: FilesApi) -> str | None:
    """None when a stored entry reached the Volume and (with memory off) came back as a Volume
    hit, else what went wrong."""
    call = speak_call("m-probe-seed")
    memory_on = peer.settings.get("cache.memory.max_bytes") != 0
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.post(peer.speak_url, data=call.body, headers=call.headers()) as r:
                await r.read()
                if r.status != 200:
                    return f"probe answered {r.status}"
                if r.headers.get("X-TTS-Cache-Tier") == "volume":
                    return None
            if memory_on and (await files_api.counts())["calls"].get("PUT sidecar"):
                return None  # written; it is read back from memory until evicted
            await asyncio.sleep(0.05)
    return f"the probe did not reach the Files API emulator:\n{peer.child.log_tail(5)}"
