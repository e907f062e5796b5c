"""The janitor's lease on a real PostgreSQL: one holder, takeover after expiry, a lost lease
stops deletions, and two replicas sharing a Volume never evict twice."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.config import CacheSettings, VolumeSettings
from proxy.index.entries import PostgresIndex
from proxy.index.lease import Leases
from proxy.janitor import Janitor
from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.local import LocalVolume
from proxy.storage.tiered import TieredCache
from tests.index_support import MakeIndex, make_index_fixture, rows  # noqa: F401

SIZE = 1000
LEASE = 1.0


async def test_one_holder_at_a_time_and_a_takeover_once_it_expires(
    make_index: MakeIndex,
) -> None:
    first = Leases((await make_index()).pool, holder="replica-1")
    second = Leases((await make_index()).pool, holder="replica-2")

    held = await first.acquire("janitor", LEASE)
    assert held is not None and held.held
    assert await second.acquire("janitor", LEASE) is None
    assert await first.acquire("other-job", LEASE) is not None  # leases are by name

    await asyncio.sleep(LEASE + 0.1)  # the holder stalled: no renewal
    taken = await second.acquire("janitor", LEASE)
    assert taken is not None
    assert not held.held
    assert await held.confirm() is False  # the stalled holder knows it may not delete
    assert await first.acquire("janitor", LEASE) is None

    await taken.release()
    assert await first.acquire("janitor", LEASE) is not None


async def test_a_holder_that_keeps_confirming_keeps_the_lease(make_index: MakeIndex) -> None:
    first = Leases((await make_index()).pool, holder="replica-1")
    second = Leases((await make_index()).pool, holder="replica-2")
    held = await first.acquire("janitor", LEASE)
    assert held is not None
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        assert await held.confirm()  # renewed each time half of it has gone
        assert await second.acquire("janitor", LEASE) is None
        await asyncio.sleep(LEASE / 5)


async def test_a_renewal_that_finds_the_lease_gone_stops_the_holder(
    make_index: MakeIndex, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = Leases((await make_index()).pool, holder="replica-1")
    second = Leases((await make_index()).pool, holder="replica-2")
    held = await first.acquire("janitor", LEASE)
    assert held is not None
    await asyncio.sleep(LEASE * 0.6)  # past half: the next confirm renews, if it still may
    await rows(postgres_dsn, "DELETE FROM tts_cache.leases RETURNING name")  # an operator
    assert await second.acquire("janitor", LEASE) is not None
    assert held.held  # its own deadline has not passed: only the renewal can tell
    assert await held.confirm() is False
    assert not held.held
    assert "lease janitor lost (another replica holds it)" in caplog.text


class GatedVolume(LocalVolume):
    """A LocalVolume on a shared folder that records its deletes; the first waits for a gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.deleted: list[CacheKey] = []
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def delete(self, key: CacheKey) -> None:
        self.deleted.append(key)
        if self.gate is not None and len(self.deleted) == 1:
            self.waiting.set()
            await self.gate.wait()
        await super().delete(key)


@dataclass
class Replica:
    """One proxy process: its own index pool, Volume client and cache, on shared storage."""

    index: PostgresIndex
    volume: GatedVolume
    cache: TieredCache

    def janitor(self, max_bytes: int) -> Janitor:
        settings = CacheSettings(volume=VolumeSettings(max_bytes=max_bytes))
        return Janitor(settings, self.cache, self.volume, self.index, lease_seconds=LEASE)


@pytest.fixture
async def replicas(make_index: MakeIndex, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    made = []
    for _ in range(2):
        index = await make_index(timeout_seconds=2.0)
        volume = GatedVolume(tmp_path / "volume")

        async def record(key: CacheKey, stored: Entry, index: PostgresIndex = index) -> None:
            await index.record(key, stored.meta, f"/volume/{key.digest()}")

        cache = TieredCache(
            None,
            volume,
            timeout_seconds=10.0,
            logger=logging.getLogger("test.lease"),
            after_volume_write=record,
        )
        made.append(Replica(index, volume, cache))
    yield made
    for replica in made:
        await replica.cache.aclose()


async def test_a_leader_that_lost_its_lease_stops_deleting(
    replicas: list[Replica], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = replicas
    keys = [CacheKey("alice@example.com", "t-1", f"m-{n}", "af_nicole") for n in range(10)]
    now = time.time()
    for n, stored in enumerate(keys):
        body = hashlib.sha256(stored.digest().encode()).digest() * (SIZE // 32 + 1)
        first.cache.put(
            stored,
            Entry.build(
                body[:SIZE],
                content_type="audio/mpeg",
                text_sha256="ab" * 32,
                provider="replicate",
                created_at=now - 1000 + n,
            ),
        )
    await first.cache.drain()
    budget = 5 * SIZE  # the five oldest must go, once

    first.volume.gate = asyncio.Event()
    stalled = asyncio.create_task(first.janitor(budget).run_once())
    await asyncio.wait_for(first.volume.waiting.wait(), 10)
    await asyncio.sleep(LEASE + 0.2)  # the first replica's lease runs out mid-deletion

    taken_over = await second.janitor(budget).run_once()
    assert taken_over.elected
    assert taken_over.evicted_budget == 5
    first.volume.gate.set()
    stalled_report = await stalled

    assert stalled_report.elected
    # The deletion under way when the lease ran out ends; no other one starts.
    assert first.volume.deleted == [keys[0]]
    assert stalled_report.evicted_budget <= 1
    assert set(second.volume.deleted) == set(keys[:5])
    remaining = {found.key for found in await first.volume.scan()}
    assert remaining == set(keys[5:])
    assert "lease janitor lost" in caplog.text
