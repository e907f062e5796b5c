"""Invalidation messages and group samples: their wire forms, bounds and sums, without I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.admin.history import Minute
from proxy.fleet.messages import (
    MAX_PAYLOAD_BYTES,
    PURGE,
    STORED,
    BadMessage,
    Invalidation,
    MessageIds,
    stored_batches,
)
from proxy.fleet.sample import Histogram, ProcessSample
from proxy.latency import Latency
from proxy.speak import CacheKey
from proxy.storage.scope import Scope

KEY = CacheKey("alice@example.com", "t-1", "m-1", "af_nicole")
SHA = "ab" * 32


@pytest.mark.parametrize(
    "scope",
    [
        Scope(everything=True),
        Scope("alice@example.com"),
        Scope("alice@example.com", "t-1", "m-1", "af_nicole"),
    ],
)
def test_a_purge_survives_its_wire_form(scope: Scope) -> None:
    message = Invalidation("p1.1", "p1", PURGE, scope=scope, reply="tts_fleet_x_p1")
    assert Invalidation.from_payload(message.payload()) == message


def test_stored_keys_survive_their_wire_form() -> None:
    message = Invalidation("p1.2", "p1", STORED, stored=((KEY, SHA),))
    read = Invalidation.from_payload(message.payload())
    assert read == message and read.stored[0][0] == KEY


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[]",
        json.dumps({"id": "x", "origin": "y", "kind": "delete-everything"}),
        json.dumps({"id": "x", "origin": "y", "kind": "purge"}),
        json.dumps({"id": "x", "origin": "y", "kind": "purge", "scope": {"user": "../etc"}}),
        json.dumps({"id": "x", "origin": "y", "kind": "purge", "scope": {"thread": "t-1"}}),
        json.dumps({"id": "", "origin": "y", "kind": "purge", "scope": {"all": "true"}}),
        json.dumps({"id": "x", "origin": "y", "kind": "stored", "stored": [["a", "b", "c"]]}),
        json.dumps({"id": "x", "origin": "y", "kind": "stored", "stored": [[*KEY, "short"]]}),
        json.dumps(
            {"id": "x", "origin": "y", "kind": "stored", "stored": [["a/b", *KEY[1:], SHA]]}
        ),
        "x" * (MAX_PAYLOAD_BYTES + 1),
    ],
)
def test_a_bad_payload_is_refused_with_a_reason(payload: str) -> None:
    with pytest.raises(BadMessage):
        Invalidation.from_payload(payload)


def test_stored_batches_stay_under_the_notify_limit_and_lose_nothing() -> None:
    ids = MessageIds("a1b2c3d4-4242")
    long = "x" * 128  # the longest id a key may have
    keys = [(CacheKey(f"u{i}{long[:120]}", long, long, long), SHA) for i in range(40)]
    messages = list(stored_batches(ids, keys))
    assert len(messages) > 1
    for message in messages:
        assert len(message.payload().encode()) <= MAX_PAYLOAD_BYTES
    assert [pair for m in messages for pair in m.stored] == keys
    assert len({m.id for m in messages}) == len(messages)


def test_message_ids_differ_across_processes_with_the_same_name() -> None:
    first, second = MessageIds("p-1"), MessageIds("p-1")
    assert first.next() != second.next()


def sample(hits: int, *, memory_bytes: int = 100, minute: int = 100) -> ProcessSample:
    latency = Latency()
    latency.observe(0.002)
    one = ProcessSample(memory_bytes=memory_bytes, memory_entries=1, upstream_calls=1)
    one.hits["memory"] = hits
    one.errors["upstream"] = 1
    one.breaker["closed"] = 1
    one.volume_calls[("GET", "2xx")] = 2
    one.upstream_seconds = Histogram.of(latency, detail=True)
    one.minutes = [Minute(minute, memory_hits=hits)]
    return one


def test_samples_add_counters_histograms_and_minutes() -> None:
    total = sample(3)
    total.add(sample(4, memory_bytes=50, minute=101))
    assert total.processes == 2
    assert total.hits["memory"] == 7 and total.upstream_calls == 2
    assert total.memory_bytes == 150 and total.memory_entries == 2
    assert total.breaker["closed"] == 2 and total.errors["upstream"] == 2
    assert total.volume_calls[("GET", "2xx")] == 4
    assert total.upstream_seconds.count == 2
    assert total.upstream_seconds.percentile(0.5) == pytest.approx(0.002)
    assert [(m.minute, m.memory_hits) for m in total.minutes] == [(100, 3), (101, 4)]


def test_a_sample_survives_its_wire_form() -> None:
    one = sample(5)
    data: dict[str, Any] = json.loads(json.dumps(one.to_json()))
    assert ProcessSample.from_json(data) == one
