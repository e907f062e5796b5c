"""TieredCache: read-through, promotion, write-behind, and tiers that fail or hang."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import TieredCache

KEY = CacheKey("alice@example.com", "t-9", "m-123", "af_nicole")
LOGGER = logging.getLogger("test.tiered")


def entry(body: bytes = b"audio") -> Entry:
    return Entry.build(body, content_type="audio/mpeg", text_sha256="t", provider="replicate")


def memory() -> MemoryTier:
    return MemoryTier(max_bytes=1_000_000, ttl_seconds=60, max_entry_bytes=100_000)


class DictVolume:
    """A volume in a dict that records its calls."""

    name = "volume"

    def __init__(self) -> None:
        self.entries: dict[CacheKey, Entry] = {}
        self.calls: list[str] = []
        self.closed = False

    async def get(self, key: CacheKey) -> Entry | None:
        self.calls.append("get")
        return self.entries.get(key)

    def get_nowait(self, key: CacheKey) -> Entry | None:
        return None  # every read of this Volume awaits

    async def open(self, key: CacheKey) -> Entry | None:
        return await self.get(key)

    async def put(self, key: CacheKey, entry: Entry) -> None:
        self.calls.append("put")
        self.entries[key] = entry

    async def delete(self, key: CacheKey) -> None:
        self.calls.append("delete")
        self.entries.pop(key, None)

    async def aclose(self) -> None:
        self.closed = True


class BrokenVolume(DictVolume):
    """A volume whose every operation raises."""

    async def get(self, key: CacheKey) -> Entry | None:
        raise OSError(f"disk gone under /v/{key.user}/{key.message_id}")

    async def put(self, key: CacheKey, entry: Entry) -> None:
        raise OSError(f"disk gone under /v/{key.user}/{key.message_id}")

    async def delete(self, key: CacheKey) -> None:
        raise OSError("disk gone")

    async def aclose(self) -> None:
        raise OSError("disk gone")


class HangingVolume(DictVolume):
    """A volume that answers far later than any timeout."""

    async def get(self, key: CacheKey) -> Entry | None:
        await asyncio.sleep(3600)
        return None

    async def put(self, key: CacheKey, entry: Entry) -> None:
        await asyncio.sleep(3600)


class GatedVolume(DictVolume):
    """A volume whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writes: list[bytes] = []

    async def put(self, key: CacheKey, entry: Entry) -> None:
        await self.gate.wait()
        self.writes.append(entry.body)
        await super().put(key, entry)


def cache(mem: MemoryTier | None, volume: DictVolume | None, timeout: float = 5.0) -> TieredCache:
    return TieredCache(mem, volume, timeout_seconds=timeout, logger=LOGGER)


async def test_miss_then_put_then_memory_hit() -> None:
    volume = DictVolume()
    tiers = cache(memory(), volume)
    assert await tiers.get(KEY) is None
    assert tiers.misses == 1

    stored = entry()
    tiers.put(KEY, stored)

    assert await tiers.get(KEY) == (stored, "memory")
    await tiers.drain()
    assert volume.entries[KEY] is stored
    assert volume.calls == ["get", "put"]


async def test_volume_hit_is_promoted_to_memory() -> None:
    volume = DictVolume()
    stored = entry()
    volume.entries[KEY] = stored
    mem = memory()
    tiers = cache(mem, volume)

    assert await tiers.get(KEY) == (stored, "volume")
    assert mem.get_nowait(KEY) is stored
    assert await tiers.get(KEY) == (stored, "memory")
    assert volume.calls == ["get"]


async def test_volume_only_and_memory_only() -> None:
    stored = entry()
    volume_only = cache(None, DictVolume())
    volume_only.put(KEY, stored)
    await volume_only.drain()
    assert await volume_only.get(KEY) == (stored, "volume")

    memory_only = cache(memory(), None)
    memory_only.put(KEY, stored)
    assert memory_only.pending_writes == 0
    assert await memory_only.get(KEY) == (stored, "memory")


async def test_broken_volume_is_counted_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    mem = memory()
    tiers = cache(mem, BrokenVolume())

    assert await tiers.get(KEY) is None
    assert tiers.errors == {"volume": 1}
    assert tiers.misses == 1

    stored = entry()
    tiers.put(KEY, stored)
    await tiers.drain()
    assert tiers.errors == {"volume": 2}
    assert mem.get_nowait(KEY) is stored
    assert await tiers.get(KEY) == (stored, "memory")

    await tiers.delete(KEY)
    assert mem.get_nowait(KEY) is None
    await tiers.aclose()
    assert tiers.errors == {"volume": 4}

    assert KEY.digest() in caplog.text
    for raw in (KEY.user, KEY.thread_id, KEY.message_id, KEY.voice):
        assert raw not in caplog.text


async def test_hanging_volume_is_skipped_after_the_timeout() -> None:
    mem = memory()
    tiers = cache(mem, HangingVolume(), timeout=0.05)

    async with asyncio.timeout(2):
        assert await tiers.get(KEY) is None
        stored = entry()
        tiers.put(KEY, stored)
        assert await tiers.get(KEY) == (stored, "memory")
        await tiers.drain()

    assert tiers.errors == {"volume": 2}
    assert tiers.pending_writes == 0


async def test_a_failing_memory_tier_is_skipped() -> None:
    class BrokenMemory(MemoryTier):
        def get_nowait(self, key: CacheKey) -> Entry | None:
            raise RuntimeError("boom")

        def put_nowait(self, key: CacheKey, entry: Entry) -> None:
            raise RuntimeError("boom")

    volume = DictVolume()
    tiers = cache(BrokenMemory(1000, 0, 1000), volume)
    stored = entry()
    tiers.put(KEY, stored)
    await tiers.drain()

    assert await tiers.get(KEY) == (stored, "volume")
    assert tiers.errors == {"memory": 3}


async def test_drain_awaits_background_writes() -> None:
    volume = GatedVolume()
    tiers = cache(memory(), volume)
    tiers.put(KEY, entry(b"one"))
    await asyncio.sleep(0)
    assert tiers.pending_writes == 1
    assert volume.writes == []

    drained = asyncio.create_task(tiers.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()

    volume.gate.set()
    await asyncio.wait_for(drained, 2)
    assert volume.writes == [b"one"]
    assert tiers.pending_writes == 0


async def test_writes_for_one_key_land_in_order_and_coalesce() -> None:
    volume = GatedVolume()
    tiers = cache(memory(), volume)
    tiers.put(KEY, entry(b"one"))
    await asyncio.sleep(0)  # "one" is in flight
    tiers.put(KEY, entry(b"two"))
    tiers.put(KEY, entry(b"three"))

    volume.gate.set()
    await tiers.drain()

    assert volume.writes == [b"one", b"three"]
    assert volume.entries[KEY].body == b"three"


async def test_volume_read_does_not_overwrite_a_newer_pending_entry() -> None:
    volume = GatedVolume()
    volume.entries[KEY] = entry(b"old")
    mem = MemoryTier(max_bytes=0, ttl_seconds=0, max_entry_bytes=0)
    tiers = cache(mem, volume)
    tiers.put(KEY, entry(b"new"))

    hit = await tiers.get(KEY)

    assert hit is not None and hit[1] == "volume"
    volume.gate.set()
    await tiers.drain()
    assert volume.entries[KEY].body == b"new"


async def test_delete_waits_for_the_write_in_flight() -> None:
    volume = GatedVolume()
    mem = memory()
    tiers = cache(mem, volume)
    tiers.put(KEY, entry(b"one"))
    await asyncio.sleep(0)
    tiers.put(KEY, entry(b"queued"))

    deleting = asyncio.create_task(tiers.delete(KEY))
    await asyncio.sleep(0.01)
    assert not deleting.done()
    volume.gate.set()
    await asyncio.wait_for(deleting, 2)

    assert volume.writes == [b"one"]
    assert KEY not in volume.entries
    assert mem.get_nowait(KEY) is None
    assert await tiers.get(KEY) is None


async def test_aclose_drains_then_closes_the_tiers() -> None:
    volume = GatedVolume()
    tiers = cache(memory(), volume)
    tiers.put(KEY, entry())
    volume.gate.set()

    await tiers.aclose()

    assert volume.writes == [b"audio"]
    assert volume.closed


async def test_a_write_backlog_is_bounded_in_bytes() -> None:
    gated = GatedVolume()
    tiers = TieredCache(
        memory(), gated, timeout_seconds=5.0, logger=logging.getLogger("t"), max_pending_bytes=12
    )
    keys = [CacheKey("u", "t", f"m{i}", "v") for i in range(4)]
    for key in keys:
        tiers.put(key, entry(b"12345"))  # 5 bytes each: two fit in the 12-byte backlog
    assert tiers.errors["volume_backlog"] == 2
    assert all(tiers.get_memory(key) is not None for key in keys)  # memory has them all
    gated.gate.set()
    await tiers.drain()
    assert sorted(gated.entries) == keys[:2]
    tiers.put(keys[3], entry(b"12345"))  # the backlog drained: writes resume
    await tiers.drain()
    assert keys[3] in gated.entries


async def test_the_volume_write_waits_its_delay_while_memory_serves() -> None:
    volume = DictVolume()
    tiers = TieredCache(
        memory(), volume, timeout_seconds=5.0, logger=LOGGER, write_delay_seconds=0.2
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    tiers.put(KEY, entry(b"one"))
    tiers.put(KEY, entry(b"two"))
    await asyncio.sleep(0.05)
    assert volume.calls == [] and tiers.pending_writes == 1
    found = await tiers.get(KEY)
    assert found is not None and found[0].body == b"two" and found[1] == "memory"
    await tiers.drain()
    assert loop.time() - started >= 0.2
    assert volume.calls == ["put"] and volume.entries[KEY].body == b"two"  # one write for both


async def test_a_delete_within_the_delay_cancels_the_pending_write() -> None:
    volume = DictVolume()
    tiers = TieredCache(
        memory(), volume, timeout_seconds=5.0, logger=LOGGER, write_delay_seconds=0.1
    )
    tiers.put(KEY, entry(b"one"))
    await tiers.delete(KEY)
    await tiers.drain()
    assert "put" not in volume.calls and KEY not in volume.entries
    assert await tiers.get(KEY) is None
