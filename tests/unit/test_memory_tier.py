"""MemoryTier: LRU order, TTL, the byte bound, admission, and the disabled tier."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.memory import MemoryTier

OVERHEAD = Entry.build(b"", content_type="audio/mpeg", text_sha256="t", provider=None).size


def key(n: int | str) -> CacheKey:
    return CacheKey("alice@example.com", "t-1", f"m-{n}", "af_nicole")


def entry(size: int, fill: bytes = b"a") -> Entry:
    return Entry.build(
        (fill * size)[:size], content_type="audio/mpeg", text_sha256="t", provider="replicate"
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_put_then_get_returns_the_entry() -> None:
    tier = MemoryTier(max_bytes=1_000_000, ttl_seconds=60, max_entry_bytes=100_000)
    stored = entry(1000)
    tier.put_nowait(key(1), stored)
    assert tier.get_nowait(key(1)) is stored
    assert await tier.get(key(1)) is stored
    assert await tier.get(key(2)) is None
    assert tier.entry_count == 1
    assert tier.current_bytes == stored.size


async def test_least_recently_used_is_evicted_first() -> None:
    one = entry(1000)
    tier = MemoryTier(max_bytes=3 * one.size, ttl_seconds=0, max_entry_bytes=10_000)
    for n in (1, 2, 3):
        await tier.put(key(n), entry(1000))
    assert tier.get_nowait(key(1)) is not None  # 1 is now the most recently used

    tier.put_nowait(key(4), entry(1000))

    assert tier.get_nowait(key(2)) is None
    assert [n for n in (1, 3, 4) if tier.get_nowait(key(n)) is not None] == [1, 3, 4]
    assert tier.entry_count == 3


async def test_entries_expire_after_ttl() -> None:
    clock = Clock()
    tier = MemoryTier(max_bytes=1_000_000, ttl_seconds=10, max_entry_bytes=100_000, clock=clock)
    tier.put_nowait(key(1), entry(100))
    clock.now += 9.9
    assert tier.get_nowait(key(1)) is not None
    clock.now += 0.2
    assert tier.get_nowait(key(1)) is None
    assert tier.entry_count == 0
    assert tier.current_bytes == 0


async def test_ttl_zero_means_no_expiry() -> None:
    clock = Clock()
    tier = MemoryTier(max_bytes=1_000_000, ttl_seconds=0, max_entry_bytes=100_000, clock=clock)
    tier.put_nowait(key(1), entry(100))
    clock.now += 10 * 365 * 86_400
    assert tier.get_nowait(key(1)) is not None


async def test_byte_bound_holds_after_a_burst_of_distinct_keys() -> None:
    rng = random.Random(1234)
    max_bytes = 200_000
    tier = MemoryTier(max_bytes=max_bytes, ttl_seconds=60, max_entry_bytes=50_000)
    last_admitted = -1
    for n in range(1000):
        size = rng.randint(0, 60_000)
        tier.put_nowait(key(n), entry(size))
        assert tier.current_bytes <= max_bytes
        if size <= 50_000:
            last_admitted = n
    assert tier.get_nowait(key(last_admitted)) is not None
    held = [tier.get_nowait(key(n)) for n in range(1000)]
    assert sum(e.size for e in held if e is not None) == tier.current_bytes
    assert tier.entry_count == sum(e is not None for e in held)
    assert tier.entry_count > 1


@settings(max_examples=150, deadline=None, database=None)
@given(
    max_bytes=st.integers(min_value=0, max_value=20_000),
    max_entry_bytes=st.integers(min_value=0, max_value=10_000),
    puts=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=30), st.integers(min_value=0, max_value=12_000)
        ),
        max_size=200,
    ),
)
def test_byte_bound_holds_under_any_sequence_of_puts(
    max_bytes: int, max_entry_bytes: int, puts: list[tuple[int, int]]
) -> None:
    tier = MemoryTier(max_bytes=max_bytes, ttl_seconds=0, max_entry_bytes=max_entry_bytes)
    for n, size in puts:
        stored = entry(size)
        tier.put_nowait(key(n), stored)
        assert tier.current_bytes <= max_bytes
        admitted = size <= max_entry_bytes and stored.size <= max_bytes
        # The newest put is either held (most recently used, never evicted by itself) or refused.
        assert (tier.get_nowait(key(n)) is stored) == admitted
    held = [tier.get_nowait(key(n)) for n in range(31)]
    assert sum(e.size for e in held if e is not None) == tier.current_bytes


async def test_body_over_max_entry_bytes_is_refused_and_replaces_the_older_entry() -> None:
    tier = MemoryTier(max_bytes=1_000_000, ttl_seconds=60, max_entry_bytes=1000)
    tier.put_nowait(key(1), entry(1000))
    assert tier.get_nowait(key(1)) is not None

    tier.put_nowait(key(1), entry(1001))

    assert tier.get_nowait(key(1)) is None
    assert tier.entry_count == 0
    assert tier.current_bytes == 0


async def test_entry_larger_than_the_whole_tier_is_refused() -> None:
    tier = MemoryTier(max_bytes=OVERHEAD + 100, ttl_seconds=60, max_entry_bytes=1_000_000)
    tier.put_nowait(key(1), entry(100))
    assert tier.get_nowait(key(1)) is not None

    tier.put_nowait(key(2), entry(101))
    tier.put_nowait(key(1), entry(101))

    assert tier.get_nowait(key(2)) is None
    assert tier.get_nowait(key(1)) is None
    assert tier.current_bytes == 0


async def test_disabled_tier_stores_nothing() -> None:
    tier = MemoryTier(max_bytes=0, ttl_seconds=60, max_entry_bytes=1_000_000)
    assert not tier.enabled
    tier.put_nowait(key(1), entry(10))
    await tier.put(key(2), entry(10))
    assert tier.get_nowait(key(1)) is None
    assert await tier.get(key(2)) is None
    assert tier.current_bytes == 0
    assert tier.entry_count == 0
    assert tier.delete_where(lambda _: True) == 0
    await tier.delete(key(1))
    await tier.aclose()


async def test_delete_and_delete_where() -> None:
    tier = MemoryTier(max_bytes=1_000_000, ttl_seconds=60, max_entry_bytes=100_000)
    for n in range(6):
        tier.put_nowait(key(n), entry(10))
    other = CacheKey("bob@example.com", "t-1", "m-0", "af_nicole")
    tier.put_nowait(other, entry(10))

    await tier.delete(key(0))
    removed = tier.delete_where(lambda k: k.user == "alice@example.com" and k.message_id != "m-5")

    assert removed == 4
    assert tier.get_nowait(key(5)) is not None
    assert tier.get_nowait(other) is not None
    assert tier.entry_count == 2
