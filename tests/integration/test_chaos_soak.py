"""Chaos soak: many users through the real proxy while the backend and the Volume misbehave.

Seeded and time-bounded: `SOAK_SEED` (random when unset, always printed) and `SOAK_SECONDS`
(default 25). Replay a failure with `SOAK_SEED=<seed> pytest -s <this file>`; concurrency makes
a replay close to the original, not identical.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.config import Settings
from proxy.speak import CacheKey
from proxy.state import CACHE, VOLUME
from proxy.storage.layout import voice_of
from tests.conftest import settings_for
from tests.databricks_volume_support import (  # noqa: F401 - fixtures for this test
    _no_ambient_databricks_config,
    emulator,
)
from tests.fakes import FakeLegacyBackend
from tests.fakes.files_api import Fault, FilesApiEmulator
from tests.soak_verdict import KeyScope, Verdict, VolumeTrouble, judge
from tests.soak_workload import Clients, FaultPlan, Observation
from tests.support import settle

VOLUME_PATH: Final = "/Volumes/main/default/tts"
BASE: Final = f"{VOLUME_PATH}/tts_audio"
APP_TOKEN: Final = "dapi-app-token"
# A Volume call's deadline: above the soak's bound on what the Volume may cost a request, so a
# request that waits for it breaks that promise; low enough that the answer bound holds anyway.
VOLUME_TIMEOUT_SECONDS: Final = 2.0
READY_WITHIN_SECONDS: Final = 10.0
EPISODE_SECONDS: Final = 0.8
BREAKER_POLL_SECONDS: Final = 0.005
CORRUPTED_PER_ROUND: Final = 8

MakeServer = Callable[[web.Application], Awaitable[TestServer]]


def soak_settings(tmp_path: Path, backend: FakeLegacyBackend) -> Settings:
    """The proxy on the Files API emulator: a small memory tier, short timeouts everywhere."""
    return settings_for(
        tmp_path,
        backend.url,
        **{
            "cache.volume.kind": "databricks",
            "cache.volume.path": VOLUME_PATH,
            "cache.volume.timeout_seconds": VOLUME_TIMEOUT_SECONDS,
            "cache.volume.retries": 1,
            "cache.volume.failure_threshold": 3,
            "cache.volume.cooldown_seconds": 1.0,
            # The emulator has no workspace budget to share: the limiter has tests of its own,
            # and here it would only turn this load's Volume calls into skipped writes.
            "cache.volume.max_concurrent_calls": 256,
            "cache.volume.max_calls_per_second": 100_000.0,
            # About ten 48 KiB recordings: most replays come from the Volume, and a fresh entry
            # can be evicted from memory before its Volume write has ended.
            "cache.memory.max_bytes": 512 * 1024,
            "upstream.timeout_seconds": 1.0,
            "upstream.connect_timeout_seconds": 1.0,
        },
    )


@pytest.fixture
async def files_api(
    emulator: FilesApiEmulator,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[FilesApiEmulator]:
    """The Files API emulator, a little slow as the real one is, with the app's PAT set."""
    emulator.latency = 0.01
    monkeypatch.setenv("DATABRICKS_HOST", emulator.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", APP_TOKEN)
    yield emulator


class Proxy:
    """The proxy under test: one process-worth of app at a time, restarted on the same Volume."""

    def __init__(self, make_server: MakeServer, settings: Settings) -> None:
        self.make_server = make_server
        self.settings = settings
        self.server: TestServer | None = None
        self.generation = 0

    async def start(self) -> None:
        """A new app (empty memory, the same Volume), taking traffic once it says it is ready."""
        self.server = await self.make_server(create_app(self.settings))
        self.generation += 1
        deadline = time.monotonic() + READY_WITHIN_SECONDS
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                async with session.get(self.url() + "/_proxy/ready") as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.05)
        pytest.fail(f"proxy {self.generation} was not ready within {READY_WITHIN_SECONDS:g} s")

    async def stop(self) -> None:
        """Stop as SIGTERM does: in-flight requests end, pending Volume writes finish."""
        assert self.server is not None
        await self.server.close()

    @property
    def app(self) -> web.Application:
        """The running app."""
        assert self.server is not None
        return self.server.app

    def url(self) -> str:
        """The running proxy's base URL."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"


async def watch_breaker(proxy: Proxy, trouble: VolumeTrouble, done: asyncio.Event) -> None:
    """Record when the Volume's breaker was not closed, or its call budget refused lookups (a
    429's pause holds every call back), widened by one poll on each side."""
    opened: float | None = None
    errors = proxy.app[CACHE].errors
    refused = errors["volume_busy"]
    while not done.is_set():
        now = time.monotonic()
        state = proxy.app[VOLUME].breaker_state
        busy, refused = errors["volume_busy"] > refused, errors["volume_busy"]
        troubled = state != "closed" or busy
        if troubled and opened is None:
            opened = now - BREAKER_POLL_SECONDS
        elif not troubled and opened is not None:
            trouble.breaker_open.append((opened, now))
            opened = None
        await asyncio.sleep(BREAKER_POLL_SECONDS)
    if opened is not None:
        trouble.breaker_open.append((opened, time.monotonic()))


async def episode(fault: Fault) -> None:
    """Keep an injected Volume fault on for a while."""
    await asyncio.sleep(EPISODE_SECONDS)
    fault.remaining = 0


def corrupt(files_api: FilesApiEmulator, keys: list[CacheKey], trouble: VolumeTrouble) -> None:
    """Flip a byte in the stored objects of `keys` (their sidecars stay as they were)."""
    for key in keys:
        path = f"{BASE}/{key.user}/{key.thread_id}/{key.message_id}/{key.voice}.mp3"
        if path in files_api.files:
            files_api.corrupt(path)
            trouble.corrupted.add(key)


def recent_keys(observations: list[Observation], count: int) -> list[CacheKey]:
    """The keys most recently asked for (the ones clients replay next)."""
    keys: list[CacheKey] = []
    for seen in reversed(observations):
        key = seen.recording.key
        if not seen.hostile and key not in keys:
            keys.append(key)
        if len(keys) == count:
            break
    return keys


async def restart(proxy: Proxy, clients: Clients, before_start: Callable[[], None]) -> None:
    """Stop the proxy between requests, then start a new one on the same Volume."""
    clients.gate.clear()
    await clients.idle.wait()
    await proxy.stop()
    before_start()
    await proxy.start()
    clients.gate.set()


def failed_volume_calls(files_api: FilesApiEmulator) -> set[KeyScope]:
    """Every key (or message, for folder listings) whose Volume calls failed or never ended."""
    failed: set[KeyScope] = set()
    for request in files_api.requests:
        ok = request.status is not None and (request.status < 300 or request.status == 404)
        if ok or request.endpoint not in ("files", "directories"):
            continue
        parts = request.path.removeprefix(BASE + "/").split("/")
        if len(parts) == 4:
            failed.add((parts[0], parts[1], parts[2], voice_of(parts[3])))
        elif len(parts) == 3:
            failed.add((parts[0], parts[1], parts[2], None))
    return failed


async def test_chaos_soak_keeps_every_promise(
    aiohttp_server: Any,
    legacy_backend: FakeLegacyBackend,
    files_api: FilesApiEmulator,
    tmp_path: Path,
) -> None:
    """No leak, no wrong or cut hit, answers in time, one synthesis per clean key, come what may."""
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(2**32))
    seconds = float(os.environ.get("SOAK_SECONDS") or 25)
    print(f"chaos soak: SOAK_SEED={seed} SOAK_SECONDS={seconds:g}", flush=True)
    plan = FaultPlan(seed)
    legacy_backend.speak_plan = plan
    proxy = Proxy(aiohttp_server, soak_settings(tmp_path, legacy_backend))
    await proxy.start()
    clients = Clients(seed, proxy.url, lambda: proxy.generation)
    trouble = VolumeTrouble()
    stop, done = asyncio.Event(), asyncio.Event()
    traffic = asyncio.create_task(clients.run(stop))
    watcher = asyncio.create_task(watch_breaker(proxy, trouble, done))
    rng = random.Random(f"{seed}|volume")
    started = time.monotonic()

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, started + fraction * seconds - time.monotonic()))

    try:
        await at(0.15)
        await episode(files_api.fail_next(10**9, status=500))
        await at(0.30)
        await episode(files_api.throttle_next(10**9, retry_after=1))
        await at(0.45)
        await episode(files_api.hang_next(10**9))
        await at(0.60)
        # Memory is lost, the Volume is not, and the objects clients replay next are corrupt.
        victims = recent_keys(clients.observations, CORRUPTED_PER_ROUND)
        await restart(proxy, clients, lambda: corrupt(files_api, victims, trouble))
        await at(0.72)
        await episode(files_api.fail_next(10**9, status=503, method="PUT"))
        await at(0.85)
        objects = sorted(p for p in files_api.files if p.endswith(".mp3"))
        picked = rng.sample(objects, min(CORRUPTED_PER_ROUND, len(objects)))
        keys = [
            CacheKey(*p.removeprefix(BASE + "/").removesuffix(".mp3").split("/")) for p in picked
        ]
        corrupt(files_api, keys, trouble)
        await at(1.0)
    finally:
        stop.set()
        await traffic
        await settle(proxy.app)
        done.set()
        await watcher

    trouble.failed = failed_volume_calls(files_api)
    stored = {path: file.data for path, file in files_api.files.items()}
    verdict = judge(
        Verdict(seed, seconds, started), clients.observations, plan.calls, trouble, stored, BASE
    )
    report = verdict.report()
    if verdict.failures:
        pytest.fail(report, pytrace=False)
    print(report)
