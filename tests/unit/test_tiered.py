"""TieredCache: read-through, promotion, write-behind, and tiers that fail or hang."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import RECENT_INVALIDATIONS, RECENT_PUTS, TieredCache

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


class GatedReadVolume(DictVolume):
    """A volume whose reads wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def get(self, key: CacheKey) -> Entry | None:
        await self.gate.wait()
        return await super().get(key)


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
    tiers = cache(memory(), volume)
    tiers.put(KEY, entry(b"new"))

    hit = await tiers.get(KEY)
    found = await tiers.open_volume(KEY)

    # The pending entry is what a lookup finds; the Volume's older one, read all the same,
    # does not replace it in memory.
    assert hit is not None and hit[0].body == b"new"
    assert isinstance(found, Entry) and found.body == b"old"
    again = tiers.get_memory(KEY)
    assert again is not None and again.body == b"new"
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


async def test_an_entry_is_readable_until_the_volume_has_it_whatever_memory_evicts() -> None:
    gated = GatedVolume()
    # Room for one 2 KiB entry: each put evicts the one before.
    small = MemoryTier(max_bytes=3_000, ttl_seconds=60, max_entry_bytes=100_000)
    tiers = cache(small, gated)
    keys = [CacheKey("u", "t", f"m{i}", "v") for i in range(3)]
    for i, key in enumerate(keys):
        tiers.put(key, entry(bytes([i]) * 2_000))
    await asyncio.sleep(0.01)  # the first writes are out, the rest queued behind the gate
    for i, key in enumerate(keys):
        found = tiers.get_memory(key)
        assert found is not None and found.body == bytes([i]) * 2_000
    gated.gate.set()
    await tiers.drain()
    # Written: the Volume has them; memory keeps the last one only.
    assert tiers.get_memory(keys[0]) is None
    assert await tiers.get(keys[0]) == (gated.entries[keys[0]], "volume")


async def test_a_delete_makes_an_entry_being_written_unreadable_at_once() -> None:
    gated = GatedVolume()
    tiers = cache(None, gated)
    tiers.put(KEY, entry())
    await asyncio.sleep(0.01)
    assert tiers.get_memory(KEY) is not None  # its write is out
    deleting = asyncio.create_task(tiers.delete(KEY))
    await asyncio.sleep(0.01)
    assert tiers.get_memory(KEY) is None  # while the delete waits for that write
    gated.gate.set()
    await deleting
    assert KEY not in gated.entries


def test_put_since_tells_whether_a_key_was_put_after_a_mark() -> None:
    tiers = cache(memory(), None)
    other = CacheKey("u", "t", "other", "v")
    tiers.put(other, entry())
    mark = tiers.put_mark()
    assert not tiers.put_since(KEY, mark) and not tiers.put_since(other, mark)
    tiers.put(KEY, entry())
    assert tiers.put_since(KEY, mark) and not tiers.put_since(other, mark)
    assert not tiers.put_since(KEY, tiers.put_mark())


def test_put_since_answers_yes_for_a_mark_older_than_it_remembers() -> None:
    tiers = cache(memory(), None)
    mark = tiers.put_mark()
    for i in range(RECENT_PUTS + 1):
        tiers.put(CacheKey("u", "t", f"m{i}", "v"), entry())
    assert tiers.put_since(KEY, mark)  # cannot tell any more: the caller looks again
    assert not tiers.put_since(KEY, tiers.put_mark())


@pytest.mark.parametrize("read", ["get", "open_volume"])
async def test_a_read_that_straddles_a_purge_is_served_but_not_kept_in_memory(read: str) -> None:
    volume = GatedReadVolume()
    volume.entries[KEY] = entry(b"before the purge")
    tiers = cache(memory(), volume)
    reading = asyncio.create_task(getattr(tiers, read)(KEY))
    await asyncio.sleep(0.01)  # the read is out
    purged = await tiers.purge_where(lambda key: key.user == KEY.user)
    volume.gate.set()
    found = await reading

    assert found is not None  # the request that asked before the purge gets its answer
    assert purged.memory == 0 and purged.written == ()
    assert tiers.get_memory(KEY) is None  # ...but memory keeps nothing the purge removed
    # A read that starts after the purge is promoted as usual.
    assert await tiers.get(KEY) is not None
    assert tiers.get_memory(KEY) is not None


async def test_an_invalidation_of_another_key_does_not_stop_a_promotion() -> None:
    volume = GatedReadVolume()
    volume.entries[KEY] = entry()
    tiers = cache(memory(), volume)
    reading = asyncio.create_task(tiers.get(KEY))
    await asyncio.sleep(0.01)
    tiers.invalidate_key(CacheKey("bob@example.com", "t-9", "m-123", "af_nicole"))
    volume.gate.set()
    await reading
    assert tiers.get_memory(KEY) is not None


async def test_a_notice_that_the_recording_read_was_stored_does_not_stop_its_promotion() -> None:
    volume = GatedReadVolume()
    read = entry(b"the recording another process stored")
    volume.entries[KEY] = read
    tiers = cache(memory(), volume)
    reading = asyncio.create_task(tiers.get(KEY))
    await asyncio.sleep(0.01)  # the read is out when the notice for this very recording comes
    tiers.invalidate_key(KEY, keep_body_sha256=read.meta.body_sha256)
    volume.gate.set()
    await reading
    assert tiers.get_memory(KEY) == read

    # A notice naming another recording still keeps what was read out of memory.
    tiers.invalidate_key(KEY)
    volume.gate.clear()
    reading = asyncio.create_task(tiers.get(KEY))
    await asyncio.sleep(0.01)
    tiers.invalidate_key(KEY, keep_body_sha256=entry(b"a newer one").meta.body_sha256)
    volume.gate.set()
    await reading
    assert tiers.get_memory(KEY) is None


def test_a_mark_older_than_the_invalidations_remembered_promotes_nothing() -> None:
    tiers = cache(memory(), None)
    mark = tiers.put_mark()
    other = CacheKey("bob@example.com", "t", "m", "v")
    for _ in range(RECENT_INVALIDATIONS + 1):
        tiers.invalidate_key(other)
    assert tiers.invalidated_since(KEY, mark)  # cannot tell any more: not promoted
    assert not tiers.invalidated_since(KEY, tiers.put_mark())
    tiers.promote(KEY, entry(), since=mark)
    assert tiers.get_memory(KEY) is None


def test_invalidate_key_keeps_the_very_recording_named_and_drops_any_other() -> None:
    tiers = cache(memory(), None)
    held = entry(b"one recording")
    tiers.put(KEY, held)
    assert not tiers.invalidate_key(KEY, keep_body_sha256=held.meta.body_sha256)
    assert tiers.get_memory(KEY) is held
    assert tiers.invalidate_key(KEY, keep_body_sha256=entry(b"another").meta.body_sha256)
    assert tiers.get_memory(KEY) is None


async def test_purge_where_names_the_keys_whose_volume_write_it_waited_for() -> None:
    gated = GatedVolume()
    tiers = cache(memory(), gated)
    other = CacheKey("bob@example.com", "t", "m", "v")
    tiers.put(KEY, entry(b"written during the purge"))
    tiers.put(other, entry())
    await asyncio.sleep(0.01)  # both writes are out, held at the gate
    purging = asyncio.create_task(tiers.purge_where(lambda key: key.user == KEY.user))
    await asyncio.sleep(0.01)
    assert not purging.done()  # it waits for the write in flight
    gated.gate.set()
    purged = await purging
    assert purged == (1, (KEY,))
    # The write landed: the caller must remove it from the Volume (purge.py, fleet/local.py).
    assert KEY in gated.entries
