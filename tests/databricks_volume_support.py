"""Shared by the DatabricksVolume tests: the Files API emulator, a volume factory, test audio."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import VolumeSettings
from proxy.identity import CURRENT_TOKEN
from proxy.speak import CacheKey
from proxy.storage.databricks.streamed import StreamedEntry
from proxy.storage.databricks.volume import DatabricksVolume
from proxy.storage.entry import Entry
from tests.fakes.files_api import FilesApiEmulator

PAT = "dapi-app-token"
CLIENT_ID = "app-client-id"
CLIENT_SECRET = "app-client-secret"
VOLUME = "/Volumes/main/default/tts"
BASE = f"{VOLUME}/tts_audio"
KEY = CacheKey("alice@example.com", "t-9", "m+123", "af_nicole")
FOLDER = f"{BASE}/alice@example.com/t-9/m+123"
OBJECT = f"{FOLDER}/af_nicole.mp3"
SIDECAR = f"{FOLDER}/af_nicole.meta.json"

MakeVolume = Callable[..., DatabricksVolume]


def audio(size: int = 64 * 1024, seed: str = "hello") -> bytes:
    """Deterministic bytes that differ everywhere between seeds."""
    blocks = bytearray()
    counter = 0
    while len(blocks) < size:
        blocks.extend(hashlib.sha256(f"{seed}|{counter}".encode()).digest())
        counter += 1
    return bytes(blocks[:size])


def entry_for(body: bytes, content_type: str = "audio/mpeg") -> Entry:
    return Entry.build(
        body,
        content_type=content_type,
        text_sha256=hashlib.sha256(b"hello").hexdigest(),
        provider="replicate",
        headers=(("content-type", content_type),),
    )


def settings(**overrides: Any) -> VolumeSettings:
    base = VolumeSettings(
        kind="databricks",
        path=VOLUME,
        prefix="tts_audio",
        timeout_seconds=2.0,
        auth="app",
        retries=2,
        failure_threshold=3,
        cooldown_seconds=30.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(autouse=True)
def _no_ambient_databricks_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """Nothing from this machine's environment or ~/.databrickscfg leaks into the SDK."""
    for name in list(os.environ):
        if name.startswith(("DATABRICKS_", "ARM_", "AZURE_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    yield


@pytest.fixture
async def emulator() -> AsyncIterator[FilesApiEmulator]:
    server = FilesApiEmulator(chunk_size=16 * 1024)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def make_volume(emulator: FilesApiEmulator) -> AsyncIterator[MakeVolume]:
    """A factory of volumes on the emulator (PAT auth unless told otherwise), closed after."""
    made: list[DatabricksVolume] = []

    def make(**options: Any) -> DatabricksVolume:
        volume_settings = settings(**options.pop("settings", {}))
        options.setdefault("host", emulator.url)
        options.setdefault("config_options", {"token": PAT})
        options.setdefault("jitter", lambda: 0.0)
        volume = DatabricksVolume(volume_settings, **options)
        made.append(volume)
        return volume

    yield make
    for volume in made:
        await volume.aclose()


async def as_user(token: str | None, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` in its own task with CURRENT_TOKEN set, as a request handler would."""

    async def run() -> Any:
        CURRENT_TOKEN.set(token)
        return await work()

    return await asyncio.create_task(run())


async def collect(streamed: StreamedEntry | Entry) -> bytes:
    """The body of what `open` answered: a checked whole entry, or a stream read to its end."""
    if isinstance(streamed, Entry):
        return streamed.body
    try:
        return b"".join([chunk async for chunk in streamed])
    finally:
        await streamed.aclose()
