"""The entries table on a real PostgreSQL: record, list, buffered hits, removal, stats."""

from __future__ import annotations

import time

import pytest

from proxy.speak import CacheKey
from tests.index_support import (
    ALICE,
    BOB,
    KEY,
    MakeIndex,
    eventually,
    make_index_fixture,  # noqa: F401
    meta,
    path_of,
)


async def test_record_list_and_upsert(make_index: MakeIndex) -> None:
    index = await make_index()
    other_voice = CacheKey(ALICE, "t-9", "m-123", "bf_emma")
    other_thread = CacheKey(ALICE, "t-10", "m-7", "af_nicole")
    bobs = CacheKey(BOB, "t-1", "m-1", "af_nicole")
    for number, key in enumerate((KEY, other_voice, other_thread, bobs)):
        await index.record(
            key, meta(length=100 + number, created_at=1_700_000_000 + number), path_of(key)
        )

    everything = await index.list_entries()
    assert [entry.key for entry in everything] == [bobs, other_thread, other_voice, KEY]
    alices = await index.list_entries(user=ALICE)
    assert {entry.key for entry in alices} == {KEY, other_voice, other_thread}
    assert [e.key for e in await index.list_entries(user=ALICE, thread_id="t-9")] == [
        other_voice,
        KEY,
    ]
    assert [e.key for e in await index.list_entries(user=ALICE, voice="bf_emma")] == [other_voice]
    assert [e.key for e in await index.list_entries(limit=2, offset=1)] == [
        other_thread,
        other_voice,
    ]
    assert await index.list_entries(user="nobody@example.com") == []

    (entry,) = await index.list_entries(user=ALICE, message_id="m-123", voice="af_nicole")
    assert entry.path == path_of(KEY)
    assert entry.bytes == 100
    assert entry.provider == "replicate"
    assert entry.content_type == "audio/mpeg"
    assert entry.body_sha256 == "b" * 64 and entry.text_sha256 == "a" * 64
    assert entry.created_at == 1_700_000_000
    assert entry.last_hit_at == entry.created_at
    assert entry.hits == 0

    # An edited message is stored again under the same key: one row, the new recording.
    await index.record(KEY, meta(length=555, provider="deepgram"), path_of(KEY))
    (replaced,) = await index.list_entries(user=ALICE, message_id="m-123", voice="af_nicole")
    assert (replaced.bytes, replaced.provider, replaced.hits) == (555, "deepgram", 0)
    assert len(await index.list_entries()) == 4

    with pytest.raises(ValueError):
        await index.list_entries(limit=0)
    with pytest.raises(ValueError):
        await index.list_entries(offset=-1)


async def test_touch_is_buffered_then_flushed(make_index: MakeIndex) -> None:
    index = await make_index(flush_interval_seconds=3600)
    await index.record(KEY, meta(created_at=1_700_000_000), path_of(KEY))

    started = time.perf_counter()
    for _ in range(3):
        await index.touch(KEY)
    assert time.perf_counter() - started < 0.01
    assert index.pending_touches == 1
    assert (await index.list_entries(user=ALICE))[0].hits == 0

    assert await index.flush() == 1
    (entry,) = await index.list_entries(user=ALICE)
    assert entry.hits == 3
    assert entry.last_hit_at > entry.created_at
    assert index.pending_touches == 0
    assert await index.flush() == 0


async def test_touch_is_flushed_in_the_background(make_index: MakeIndex) -> None:
    index = await make_index(flush_interval_seconds=0.1)
    await index.record(KEY, meta(), path_of(KEY))

    await index.touch(KEY)
    await index.touch(CacheKey(BOB, "t", "never-stored", "af_nicole"))

    async def counted() -> bool:
        return (await index.list_entries(user=ALICE))[0].hits == 1

    await eventually(counted, within=3.0)
    assert index.pending_touches == 0


async def test_remove_and_remove_prefix(make_index: MakeIndex) -> None:
    index = await make_index()
    keys = [
        CacheKey(ALICE, "t-1", "m-1", "af_nicole"),
        CacheKey(ALICE, "t-1", "m-1", "bf_emma"),
        CacheKey(ALICE, "t-1", "m-2", "af_nicole"),
        CacheKey(ALICE, "t-2", "m-3", "af_nicole"),
        CacheKey(BOB, "t-1", "m-1", "af_nicole"),
    ]
    for key in keys:
        await index.record(key, meta(), path_of(key))

    assert await index.remove(keys[0]) is True
    assert await index.remove(keys[0]) is False
    assert await index.remove_prefix(ALICE, "t-1", "m-1") == 1
    assert await index.remove_prefix(ALICE, "t-1") == 1
    assert await index.remove_prefix(ALICE) == 1
    assert await index.remove_prefix(ALICE) == 0
    assert [entry.key for entry in await index.list_entries()] == [keys[4]]


async def test_stats_totals_and_top_users(make_index: MakeIndex) -> None:
    index = await make_index()
    empty = await index.stats()
    assert (empty.entries, empty.bytes, empty.hits, empty.top_users) == (0, 0, 0, ())

    for number in range(22):
        user = f"user{number:02d}@example.com"
        for message in range(2):
            key = CacheKey(user, "t", f"m-{message}", "af_nicole")
            await index.record(key, meta(length=1000 * (number + 1)), path_of(key))
    await index.touch(CacheKey("user21@example.com", "t", "m-0", "af_nicole"))
    await index.flush()

    stats = await index.stats()
    assert stats.entries == 44
    assert stats.bytes == 2 * sum(1000 * (n + 1) for n in range(22))
    assert stats.hits == 1
    assert len(stats.top_users) == 20
    assert stats.top_users[0].user == "user21@example.com"
    assert (stats.top_users[0].entries, stats.top_users[0].bytes) == (2, 44_000)
    assert [usage.bytes for usage in stats.top_users] == sorted(
        (usage.bytes for usage in stats.top_users), reverse=True
    )
    assert "user00@example.com" not in {usage.user for usage in stats.top_users}


async def test_a_late_record_never_replaces_a_fresher_row_and_known_keys(
    make_index: MakeIndex,
) -> None:
    index = await make_index()
    other = CacheKey(ALICE, "t-9", "m-other", "af_nicole")
    await index.record(KEY, meta(length=200, created_at=1_700_000_100), path_of(KEY))
    # A row kept through an outage, or found by a walk, made before the one recorded since.
    await index.record(
        KEY, meta(length=100, created_at=1_700_000_000), path_of(KEY), newer_only=True
    )
    assert [entry.bytes for entry in await index.list_entries()] == [200]
    await index.record(
        KEY, meta(length=300, created_at=1_700_000_200), path_of(KEY), newer_only=True
    )
    assert [entry.bytes for entry in await index.list_entries()] == [300]
    assert await index.known([KEY, other]) == {KEY}
    assert await index.known([]) == set()
