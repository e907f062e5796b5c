"""Lookups through the index: Files API calls and time to first byte per Databricks miss, with
`cache.volume.lookup_via_index` off and on, and the index query alone.

    .venv/bin/python -m bench.index_lookup [--misses 200] [--latency 0.030]

Everything runs in this process: a throwaway PostgreSQL cluster (tests/pg.py), the Files API
emulator with `--latency` seconds added to every call (the bench's model of a Files API call), the
fake legacy backend (answers at once), and the proxy. Each miss asks for a message nobody asked
for before; the Files API reads of its lookup (GET or HEAD of a sidecar or an object) are counted
by the emulator, the writes behind it apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
import asyncpg
from aiohttp.test_utils import TestServer

from proxy.app import create_app
from proxy.config import load_settings
from proxy.index.coverage import VolumeCoverage
from proxy.index.lookup import IndexLookup
from proxy.speak import CacheKey
from proxy.state import CACHE, JANITOR
from tests.fakes.files_api import FilesApiEmulator
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.pg import find_bindir, start_cluster, with_database

VOLUME = "/Volumes/main/default/tts"
TOKEN = "dapi-bench-token"
USER = {"X-Forwarded-Email": "bench@example.com"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run both modes and print one markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.index_lookup", description=__doc__)
    parser.add_argument("--misses", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.030, help="seconds added per call")
    args = parser.parse_args(argv)
    if find_bindir() is None:
        raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl) found")
    cluster = start_cluster()
    try:
        asyncio.run(run(cluster.admin_dsn, args.misses, args.latency))
    finally:
        cluster.remove()
    return 0


async def run(admin_dsn: str, misses: int, latency: float) -> None:
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute('CREATE DATABASE "bench_index_lookup"')
    await admin.close()
    dsn = with_database(admin_dsn, "bench_index_lookup")
    emulator = FilesApiEmulator(volumes=[VOLUME], tokens=[TOKEN])
    emulator.latency = latency
    await emulator.start()
    os.environ.update(
        DATABRICKS_HOST=emulator.url,
        DATABRICKS_TOKEN=TOKEN,
        DATABRICKS_CONFIG_FILE="/nonexistent-databrickscfg",
    )
    backend = FakeLegacyBackend()
    await backend.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for mode in ("off", "when-complete"):
                rows.append(await misses_with(mode, dsn, backend, emulator, misses, folder))
            query = await index_query(dsn, misses)
    finally:
        await backend.stop()
        await emulator.stop()
    print(f"{misses} misses, {latency * 1000:.0f} ms added to each Files API call\n")
    print("| lookup_via_index | Files API reads per miss | other calls per miss (writes) |", end="")
    print(" miss TTFB p50 | p90 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, reads, writes, ttfb in rows:
        p50, p90 = _quantiles(ttfb)
        print(f"| {mode} | {reads:.2f} | {writes:.2f} | {p50:.1f} ms | {p90:.1f} ms |")
    p50, p90 = _quantiles(query)
    p99 = statistics.quantiles(query, n=100)[98]
    print(
        f"\nthe index query alone ({len(query)} lookups): p50 {p50:.2f} ms, p90 {p90:.2f} ms,",
        end="",
    )
    print(f" p99 {p99:.2f} ms")


async def misses_with(
    mode: str,
    dsn: str,
    backend: FakeLegacyBackend,
    emulator: FilesApiEmulator,
    misses: int,
    folder: str,
) -> tuple[str, float, float, list[float]]:
    """(mode, lookup reads per miss, other calls per miss, time to first byte of each, ms)."""
    settings = load_settings(
        env={},
        overrides={
            "upstream.url": backend.url,
            "server.access_log": False,
            "cache.volume.kind": "databricks",
            "cache.volume.path": VOLUME,
            "cache.volume.lookup_via_index": mode,
            "cache.volume.max_calls_per_second": 100_000.0,  # the limiter is not measured here
            "cache.janitor_interval_seconds": 3600.0,
            "index.dsn": dsn,
        },
    )
    server = TestServer(create_app(settings))
    await server.start_server()
    app = server.app
    assert app is not None
    await app[JANITOR].run_once()  # the walk: the index covers the (so far empty) Volume
    ttfb: list[float] = []
    async with aiohttp.ClientSession() as session:
        await _speak(session, server, f"{mode}-warm-up")  # builds the SDK's configuration
        await app[CACHE].drain()
        reads, calls = _reads(emulator), len(emulator.requests)
        for n in range(misses):
            started = time.perf_counter()
            await _speak(session, server, f"{mode}-{n}", on_head=started, into=ttfb)
        await app[CACHE].drain()  # the writes behind the misses
        read = _reads(emulator) - reads
        other = len(emulator.requests) - calls - read
    await server.close()
    return mode, read / misses, other / misses, ttfb


async def index_query(dsn: str, count: int) -> list[float]:
    """The index query of a lookup alone, in ms: `count` keys, none stored, the Volume covered."""
    from proxy.index.entries import PostgresIndex

    index = PostgresIndex(dsn)
    await index.start()
    coverage = VolumeCoverage(index.pool, "databricks:bench")
    await coverage.complete_walk(await coverage.begin_walk())
    lookup = IndexLookup(
        index, "databricks:bench", trust="when-complete", wait_seconds=1.0, counts=Counter()
    )
    timings = []
    for n in range(count + 20):
        key = CacheKey("bench@example.com", "t-1", f"q-{n}", "af_nicole")
        started = time.perf_counter()
        await lookup.may_be_stored(key, "a" * 64, None)
        if n >= 20:  # the first ones open connections and prepare the statement
            timings.append((time.perf_counter() - started) * 1000)
    await index.aclose()
    return timings


async def _speak(
    session: aiohttp.ClientSession,
    server: TestServer,
    message: str,
    *,
    on_head: float | None = None,
    into: list[float] | None = None,
) -> None:
    payload: dict[str, Any] = {
        "text": f"bench {message}",
        "voice": "af_nicole",
        "message_id": message,
        "thread_id": "t-1",
        "save_to_volume": True,
    }
    async with session.post(server.make_url("/api/tts/speak"), json=payload, headers=USER) as r:
        if on_head is not None and into is not None:
            into.append((time.perf_counter() - on_head) * 1000)
        assert r.headers["X-TTS-Cache"] == "miss", r.headers
        await r.read()


def _reads(emulator: FilesApiEmulator) -> int:
    return emulator.count("GET", "files") + emulator.count("HEAD", "files")


def _quantiles(values: list[float]) -> tuple[float, float]:
    deciles = statistics.quantiles(values, n=10)
    return statistics.median(values), deciles[8]


if __name__ == "__main__":
    raise SystemExit(main())
