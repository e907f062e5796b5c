"""GET /_proxy/metrics: Prometheus text that counts a known sequence of requests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from proxy.state import CACHE, JANITOR
from tests.conftest import settings_for
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, SPEAK, TOKEN, logged_client, settle, speak, speak_body

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Any) -> Samples:
    async with client.get("/_proxy/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_a_known_sequence_of_requests(
    aiohttp_server: Any, aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"admin.token": TOKEN})
    client = await logged_client(aiohttp_server, aiohttp_client, settings)
    cache = client.app[CACHE]

    # m-1: a miss, then two memory hits, then (memory cleared) a Volume hit.
    assert (await speak(client, SPEAK, speak_body())).cache == "miss"
    await cache.drain()
    for _ in range(2):
        assert (await speak(client, SPEAK, speak_body())).tier == "memory"
    cache.memory.clear()
    assert (await speak(client, SPEAK, speak_body())).tier == "volume"
    # Nobody to cache for: disabled, forwarded.
    assert (await speak(client, SPEAK, speak_body(), headers={})).cache == "disabled"
    # m-2: two identical requests at once, one upstream call.
    legacy_backend.speak.headers_delay = 0.3
    both = await asyncio.gather(
        speak(client, SPEAK, speak_body(message_id="m-2")),
        speak(client, SPEAK, speak_body(message_id="m-2")),
    )
    assert [s.cache for s in both] == ["miss", "miss"]
    legacy_backend.speak.headers_delay = 0.0
    # m-3: the upstream fails.
    legacy_backend.speak.status = 500
    failed = await speak(client, SPEAK, speak_body(message_id="m-3"))
    assert failed.status == 500 and failed.cache == "miss"
    legacy_backend.speak.status = 200
    await cache.drain()
    # The audio URL answers from the cache too, but it is no speak request: not counted.
    async with client.get("/_proxy/audio/t-1/m-1/af_nicole", headers=ALICE) as audio:
        assert audio.status == 200

    samples = await scrape(client)
    assert value(samples, "tts_proxy_requests_total", outcome="hit", tier="memory") == 2
    assert value(samples, "tts_proxy_requests_total", outcome="hit", tier="volume") == 1
    assert value(samples, "tts_proxy_requests_total", outcome="miss", tier="") == 4
    assert value(samples, "tts_proxy_requests_total", outcome="disabled", tier="") == 1
    assert value(samples, "tts_proxy_upstream_calls_total") == 3
    assert legacy_backend.calls[SPEAK] == 4  # three misses and the forwarded request
    assert value(samples, "tts_proxy_coalesced_total") == 1
    assert value(samples, "tts_proxy_stored_total") == 2
    assert value(samples, "tts_proxy_errors_total", kind="upstream") == 1
    assert value(samples, "tts_proxy_errors_total", kind="volume") == 0
    assert value(samples, "tts_proxy_errors_total", kind="index") == 0
    # m-1 came back into memory from the Volume; m-2 was stored in both.
    assert value(samples, "tts_proxy_cache_entries", tier="memory") == 2
    assert value(samples, "tts_proxy_cache_bytes", tier="memory") > 2 * 64 * 1024
    # Response times, observed by the access logger, by outcome.
    count = "tts_proxy_request_duration_seconds_count"
    assert value(samples, count, outcome="hit") == 3
    assert value(samples, count, outcome="miss") == 4
    assert value(samples, count, outcome="disabled") == 1
    inf = value(samples, "tts_proxy_request_duration_seconds_bucket", outcome="miss", le="+Inf")
    assert inf == 4
    # The coalesced pair waited for the backend's 0.3 s: their times say so.
    slow = value(samples, "tts_proxy_request_duration_seconds_bucket", outcome="miss", le="0.25")
    assert slow <= 2
    # Time to the upstream's headers: three misses and the forwarded request.
    assert value(samples, "tts_proxy_upstream_duration_seconds_count") == 4
    assert value(samples, "tts_proxy_upstream_duration_seconds_sum") >= 0.3


async def test_janitor_evictions_are_counted_by_reason(
    aiohttp_server: Any, aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"cache.volume.max_bytes": 100_000})
    client = await logged_client(aiohttp_server, aiohttp_client, settings)
    for message in ("m-1", "m-2", "m-3"):
        assert (await speak(client, SPEAK, speak_body(message_id=message))).cache == "miss"
    await settle(client.app)
    await client.app[JANITOR].run_once()

    samples = await scrape(client)
    assert value(samples, "tts_proxy_evictions_total", reason="budget") == 2
    assert value(samples, "tts_proxy_evictions_total", reason="ttl") == 0
    # Scraping again does not count the same run twice.
    assert value(await scrape(client), "tts_proxy_evictions_total", reason="budget") == 2


async def test_each_app_has_its_own_registry_and_the_endpoint_is_open(
    aiohttp_server: Any, aiohttp_client: Any, legacy_backend: FakeLegacyBackend, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, legacy_backend.url, **{"admin.token": TOKEN})
    first = await logged_client(aiohttp_server, aiohttp_client, settings)
    second = await logged_client(aiohttp_server, aiohttp_client, settings)
    await speak(first, SPEAK, speak_body(), headers=ALICE)

    # No token needed: scrapers rarely carry one, and nothing here names a user.
    one, two = await scrape(first), await scrape(second)
    assert value(one, "tts_proxy_requests_total", outcome="miss", tier="") == 1
    assert value(two, "tts_proxy_requests_total", outcome="miss", tier="") == 0
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("tts_proxy") for name in global_names)
    async with first.get("/_proxy/metrics") as response:
        assert "alice" not in await response.text()
