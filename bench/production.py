"""The production replay: the Volume behind the Files API (its latency and budget), memory small.

The replay's workload against the proxy whose Volume is the Files API emulator with 30 ms added to
every call and the workspace's budget (10 calls at once, 100 a second, 429 past either), the
proxy's own limiter at its defaults (8 and 80: a replica's share), and a memory tier far smaller
than the working set; once without the PostgreSQL index, once with it (lookups through the index).
nginx runs the same workload on its local disk for reference.

What a row reports, beside the usual numbers: answers by tier, Files API calls per request (and by
kind), the time to first byte of a Volume hit, how long calls waited for the limiter, 429s, and the
write-behind's account once it has settled: every stored response written, skipped (the backlog
was full) or failed, and each of those counted by the proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp

from bench.files_peers import FilesApi, on_files_api, start_files_api
from bench.loadgen import closed_loop
from bench.peers import Peer, Unavailable
from bench.replay import replay_row
from bench.results import Row, failed
from bench.scenarios import FAST_BEHAVIOUR, MIB, Bench, absent
from bench.workload import speak_call, zipf_replay

PRODUCTION: Final = "production replay"
LATENCY_SECONDS: Final = 0.030
WORKSPACE_CONCURRENT: Final = 10
WORKSPACE_PER_SECOND: Final = 100
MEMORY_BYTES: Final = 16 * MIB
# How long the write-behind may take to settle after the load before its account is taken.
SETTLE_SECONDS: Final = 60.0


async def production_replay(bench: Bench) -> None:
    """The replay against the Files API's latency and budget, without and with the index."""
    await bench.backend.behave(**FAST_BEHAVIOUR)
    options = bench.options
    workload = zipf_replay(requests=options.production_requests, tag="production")
    size = int(FAST_BEHAVIOUR["size"])
    apis: dict[str, FilesApi] = {}
    for key, spec in (
        ("ours-files", _files_peer(apis, index=False)),
        ("ours-files-index", _files_peer(apis, index=True)),
        ("nginx", None),
    ):
        peer = await bench.peer(key, spec)
        if isinstance(peer, Unavailable):
            bench.add(absent(PRODUCTION, peer, size))
            continue
        files_api = apis.get(key)
        try:
            before = await bench.backend.calls()
            calls_before = await _calls(files_api)
            numbers_before = await scrape(peer) if peer.kind == "ours" else {}
            started = time.monotonic()
            run = await closed_loop(
                peer.speak_url,
                workload.calls,
                concurrency=options.replay_concurrency,
                max_seconds=options.production_seconds,
            )
            upstream = await bench.backend.calls() - before
            calls_during = _minus(await _calls(files_api), calls_before)
            account = await _settled(peer) if peer.kind == "ours" else {}
            account = {k: v - numbers_before.get(k, 0.0) for k, v in account.items()}
            calls_after = _minus(await _calls(files_api), calls_before)
        except Exception as exc:
            bench.add(failed(PRODUCTION, peer.key, peer.label, size, exc))
            continue
        row = replay_row(PRODUCTION, peer, size, run, workload, upstream)
        sent = len(run.samples) + run.failures
        if sent < len(workload.calls):
            row.notes.append(
                f"stopped after {time.monotonic() - started:.0f} s: "
                f"{sent:,} of {len(workload.calls):,} requests"
            )
        if files_api is not None:
            _account(row, sent, calls_during, calls_after, account)
        row.notes += peer.notes
        bench.add(row)
    await bench.release("ours-files", "ours-files-index")


def _files_peer(apis: dict[str, FilesApi], *, index: bool) -> Callable[[Bench], Any]:
    async def start(bench: Bench) -> Peer | Unavailable:
        key = "ours-files-index" if index else "ours-files"
        label = f"ours (Files API{' + index' if index else ''}, memory {MEMORY_BYTES // MIB} MiB)"
        settings: dict[str, Any] = {
            "cache.memory.max_bytes": MEMORY_BYTES,
            "server.access_log": True,
        }
        if index:
            dsn = await _index_database(bench)
            if dsn is None:
                return Unavailable(key, label, "no PostgreSQL binaries (initdb, pg_ctl) here")
            settings.update({"index.dsn": dsn, "cache.volume.lookup_via_index": "when-complete"})
        files_api = await start_files_api(
            bench.lab,
            f"files-api-{key}",
            latency=LATENCY_SECONDS,
            max_concurrent=WORKSPACE_CONCURRENT,
            max_per_second=WORKSPACE_PER_SECOND,
        )
        peer = await on_files_api(
            bench.lab, key, label, bench.backend, files_api, settings=settings
        )
        if isinstance(peer, Peer):
            apis[key] = files_api
            if index and not await _index_trusted(bench, peer):
                peer.notes = ["the index never covered the Volume: lookups went to the Volume"]
        return peer

    return start


async def _index_trusted(bench: Bench, peer: Peer, within: float = 30.0) -> bool:
    """Wait until a lookup skips the Volume on the index's word (its walk covered the Volume)."""
    deadline = time.monotonic() + within
    absent = 'tts_proxy_index_lookups_total{outcome="absent"}'
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            call = speak_call(bench.unique("index-probe"))
            async with session.post(peer.speak_url, data=call.body, headers=call.headers()) as r:
                await r.read()
            if (await scrape(peer)).get(absent, 0.0) > 0:
                return True
            await asyncio.sleep(0.5)
    return False


async def _index_database(bench: Bench) -> str | None:
    """A database on a throwaway PostgreSQL cluster, removed when the run ends."""
    from tests.pg import find_bindir, start_cluster, with_database

    if find_bindir() is None:
        return None
    cluster = await asyncio.to_thread(start_cluster)
    bench.cleanups.append(cluster.remove)
    import asyncpg

    admin = await asyncpg.connect(cluster.admin_dsn)
    try:
        await admin.execute('CREATE DATABASE "bench_production"')
    finally:
        await admin.close()
    return with_database(cluster.admin_dsn, "bench_production")


async def _calls(files_api: FilesApi | None) -> dict[str, Any]:
    return await files_api.counts() if files_api is not None else {"calls": {}, "over_limit": 0}


def _minus(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    calls = {k: v - before["calls"].get(k, 0) for k, v in now["calls"].items()}
    return {
        "calls": {k: v for k, v in calls.items() if v},
        "over_limit": now["over_limit"] - before["over_limit"],
        "max_in_flight": now.get("max_in_flight", 0),
    }


async def _settled(peer: Peer) -> dict[str, float]:
    """The proxy's counters once its write-behind has settled (or SETTLE_SECONDS passed)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    last: dict[str, float] = {}
    steady = 0
    while time.monotonic() < deadline:
        numbers = await scrape(peer)
        steady = steady + 1 if numbers == last else 0
        last = numbers
        if steady >= 3:  # nothing moved for 1.5 s
            break
        await asyncio.sleep(0.5)
    return last


async def scrape(peer: Peer) -> dict[str, float]:
    """The proxy's /_proxy/metrics as {"name{labels}": value}."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{peer.url}/_proxy/metrics") as response,
    ):
        text = await response.text()
    numbers: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            numbers[name] = float(value)
    return numbers


def _account(
    row: Row,
    sent: int,
    during: dict[str, Any],
    after: dict[str, Any],
    numbers: dict[str, float],
) -> None:
    """Files API calls per request, the budget's effects, and the write-behind's account."""
    calls = {k: v for k, v in after["calls"].items() if k != "throttled"}
    total_during = sum(v for k, v in during["calls"].items() if k != "throttled")
    hits = {
        tier: numbers.get(f'tts_proxy_requests_total{{outcome="hit",tier="{tier}"}}', 0.0)
        for tier in ("memory", "volume")
    }
    misses = numbers.get('tts_proxy_requests_total{outcome="miss",tier=""}', 0.0)
    stored = numbers.get("tts_proxy_stored_total", 0.0)
    skipped = numbers.get('tts_proxy_errors_total{kind="volume_backlog"}', 0.0)
    volume_errors = numbers.get('tts_proxy_errors_total{kind="volume"}', 0.0)
    # Calls the budget could not start in their time: lookups gone upstream, writes not made.
    volume_busy = numbers.get('tts_proxy_errors_total{kind="volume_busy"}', 0.0)
    written = calls.get("PUT sidecar", 0)
    row.extra.update(
        files_api_calls=calls,
        files_api_calls_per_request=total_during / sent if sent else 0.0,
        files_api_calls_after_load=sum(calls.values()) - total_during,
        throttled_429=after["over_limit"],
        most_calls_at_once=after.get("max_in_flight", 0),
        limiter_wait_seconds=numbers.get("tts_proxy_volume_call_wait_seconds_total", 0.0),
        proxy_hits=hits,
        proxy_misses=misses,
        stored=stored,
        writes_done=written,
        writes_skipped=skipped,
        volume_errors=volume_errors,
        volume_busy=volume_busy,
    )
    counted = hits["memory"] + hits["volume"] + misses
    if counted != sent:
        row.problem(f"the proxy counted {counted:.0f} answers for {sent} requests")
    unaccounted = stored - written - skipped
    if unaccounted > volume_errors + volume_busy:
        row.problem(
            f"{unaccounted:.0f} stored responses neither written nor skipped, "
            f"{volume_errors:.0f} Volume errors and {volume_busy:.0f} busy counted"
        )
