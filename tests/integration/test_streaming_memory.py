"""200 MiB each way through the proxy process, with its resident memory bounded."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.fakes import FakeLegacyBackend

if TYPE_CHECKING:
    from tests.conftest import StartProxy

MiB = 1024 * 1024
SIZE = 200 * MiB
WARM_UP = 8 * MiB
MAX_GROWTH = 64 * MiB
CHUNK = 64 * 1024

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc"
)


def rss_bytes(pid: int) -> int:
    """The resident set size of `pid`, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def expected_sha256(size: int) -> str:
    """The sha256 of the bytes /download?size=`size` streams."""
    digest = hashlib.sha256()
    for chunk in FakeLegacyBackend.download_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


class PeakRss:
    """Samples a process's RSS in the background and keeps the highest value seen."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid = pid
        self.every = every
        self.peak = rss_bytes(pid)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, rss_bytes(self.pid))

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(self.every)


async def download(session: aiohttp.ClientSession, url: str, size: int) -> tuple[int, str]:
    """GET /download?size=N in chunks: (bytes received, their sha256)."""
    digest = hashlib.sha256()
    received = 0
    async with session.get(f"{url}/download?size={size}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_chunked(CHUNK):
            digest.update(chunk)
            received += len(chunk)
    return received, digest.hexdigest()


async def upload(session: aiohttp.ClientSession, url: str, size: int) -> dict[str, object]:
    """POST `size` deterministic bytes to /upload from a generator: the backend's answer."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in FakeLegacyBackend.download_chunks(size):
            yield chunk

    async with session.post(f"{url}/upload", data=body()) as response:
        assert response.status == 200
        answer: dict[str, object] = await response.json()
    return answer


@pytest.fixture
async def proxy_url(legacy_backend: FakeLegacyBackend, start_proxy: StartProxy) -> tuple[str, int]:
    """A proxy process in front of the fake backend, warmed up: (url, pid)."""
    proxy = await start_proxy(
        {"upstream.url": legacy_backend.url, "server.access_log": False, "identity.mode": "none"}
    )
    async with aiohttp.ClientSession() as session:
        assert await download(session, proxy.url, WARM_UP) == (WARM_UP, expected_sha256(WARM_UP))
        answer = await upload(session, proxy.url, WARM_UP)
        assert answer == {"length": WARM_UP, "sha256": expected_sha256(WARM_UP)}
    return proxy.url, proxy.pid


async def test_a_200_mib_download_streams_through_in_bounded_memory(
    proxy_url: tuple[str, int], legacy_backend: FakeLegacyBackend
) -> None:
    url, pid = proxy_url
    baseline = rss_bytes(pid)

    async with aiohttp.ClientSession() as session, PeakRss(pid) as rss:
        received, sha256 = await download(session, url, SIZE)

    assert received == SIZE
    assert sha256 == expected_sha256(SIZE)
    assert legacy_backend.calls["/download"] == 2
    growth = rss.peak - baseline
    assert growth < MAX_GROWTH, f"proxy RSS grew by {growth / MiB:.1f} MiB"


async def test_a_200_mib_upload_streams_through_in_bounded_memory(
    proxy_url: tuple[str, int], legacy_backend: FakeLegacyBackend
) -> None:
    url, pid = proxy_url
    baseline = rss_bytes(pid)

    async with aiohttp.ClientSession() as session, PeakRss(pid) as rss:
        answer = await upload(session, url, SIZE)

    assert answer == {"length": SIZE, "sha256": expected_sha256(SIZE)}
    assert legacy_backend.calls["/upload"] == 2
    growth = rss.peak - baseline
    assert growth < MAX_GROWTH, f"proxy RSS grew by {growth / MiB:.1f} MiB"
