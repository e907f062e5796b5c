"""The proxy's footprint: resident memory per 10,000 entries held, and per open connection.

An operator plans memory as `cache.memory.max_bytes` (what the bodies may take), plus what each
entry costs beside its body, plus what each connection costs, plus the process itself. The
first two are measured here on a fresh proxy in the default configuration (its memory tier large
enough for everything sent): RSS after a warm-up, after `footprint_entries` misses of 4 KiB bodies
(each stored), and with `footprint_connections` idle keep-alive connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from bench.loadgen import closed_loop
from bench.peers import Peer
from bench.procs import rss_bytes
from bench.production import scrape
from bench.results import Row, failed
from bench.scenarios import KIB, MIB, Bench
from bench.workload import speak_call

FOOTPRINT: Final = "footprint"
BODY_BYTES: Final = 4 * KIB
WARM_UP_REQUESTS: Final = 300


async def footprint(bench: Bench) -> None:
    """RSS growth per 10,000 entries (bodies apart) and per open connection."""
    options = bench.options
    await bench.backend.behave(size=BODY_BYTES, chunks=1, chunk_delay=0.0)
    key = "ours-footprint"
    peer = await bench.peer(
        key,
        lambda b: b.lab.ours(key, "ours (defaults, memory 1 GiB)", b.backend, settings=_settings()),
    )
    assert isinstance(peer, Peer)
    row = Row(FOOTPRINT, peer.key, peer.label, BODY_BYTES)
    try:
        await _entries(bench, peer, row, options.footprint_entries)
        await _connections(peer, row, options.footprint_connections)
    except Exception as exc:
        bench.add(failed(FOOTPRINT, peer.key, peer.label, BODY_BYTES, exc))
        return
    finally:
        await bench.release(key)
    bench.add(row)


def _settings() -> dict[str, object]:
    return {"server.access_log": True, "cache.memory.max_bytes": 1024 * MIB}


async def _entries(bench: Bench, peer: Peer, row: Row, count: int) -> None:
    warm = [speak_call(bench.unique("footprint-warm")) for _ in range(WARM_UP_REQUESTS)]
    await closed_loop(peer.speak_url, warm, concurrency=32)
    await asyncio.sleep(1.0)  # the warm-up's writes settle
    before = rss_bytes(peer.pid)
    held_before = await _memory_tier(peer)
    calls = [speak_call(bench.unique("footprint")) for _ in range(count)]
    run = await closed_loop(peer.speak_url, calls, concurrency=32)
    await asyncio.sleep(2.0)
    after = rss_bytes(peer.pid)
    entries, held = (a - b for a, b in zip(await _memory_tier(peer), held_before, strict=True))
    if run.failures or entries != count:
        row.problem(f"{entries:.0f} entries held for {count} sent ({run.failures} failed)")
    bodies = count * BODY_BYTES
    per_10k = 10_000 / count
    row.requests = len(run.samples)
    row.extra.update(
        entries=count,
        rss_growth_per_10k_entries_mib=(after - before) * per_10k / MIB,
        bodies_per_10k_entries_mib=bodies * per_10k / MIB,
        overhead_per_entry_bytes=(after - before - bodies) / count,
        counted_by_memory_tier_per_entry_bytes=(held - bodies) / count,
    )


async def _memory_tier(peer: Peer) -> tuple[float, float]:
    numbers = await scrape(peer)
    return (
        numbers.get('tts_proxy_cache_entries{tier="memory"}', 0.0),
        numbers.get('tts_proxy_cache_bytes{tier="memory"}', 0.0),
    )


async def _connections(peer: Peer, row: Row, count: int) -> None:
    host, port = peer.url.removeprefix("http://").rsplit(":", 1)
    request = f"GET /_proxy/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    before = rss_bytes(peer.pid)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, int(port))
            writers.append(writer)
            writer.write(request)
            await reader.readuntil(b"\r\n\r\n")  # the head; the small body stays unread
        await asyncio.sleep(0.5)
        after = rss_bytes(peer.pid)
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    row.extra.update(
        connections=count,
        rss_per_connection_kib=(after - before) / count / KIB,
    )
