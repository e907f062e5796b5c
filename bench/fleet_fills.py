"""`python -m bench.fleet_fills`: one synthesis per key across workers and replicas, measured.

Starts the fake legacy backend (in this process), `serve --workers N` groups and, for replicas,
a throwaway PostgreSQL as the tests start it, then measures:

- bursts of identical requests, each on a connection of its own (the kernel spreads them over
  the workers): backend calls per key, and each client's first byte after the burst's first
  (the owner's own clients against the other workers', which stream the owner's fill through
  its socket; one process alone for comparison);
- memory hits against hits through the key's owner, with the Volume off: a key requested once
  is held by its owner and the worker that asked; asked again on a worker holding no copy, it
  is served from the owner's memory over its socket (`X-TTS-Cache: miss`, collapsed, no backend
  call): the cost of serving memory hits from the owner, beside a local memory hit, and the
  entries the group holds for the keys it served;
- a follower across replicas (one worker each): its first byte after the leader's last;
- the CPU one process spends per miss and per memory hit (what a replica's cores bound).

Prints a Markdown table (docs/scaling.md has the figures and how to read them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.fleet import ADMIN, ms, start
from proxy.speak import CacheKey
from tests.conftest import ProxyProcess, free_port
from tests.e2e.test_workers import TCP_ESTABLISHED, children_of, socket_inodes, tcp_sockets
from tests.fakes import FakeLegacyBackend
from tests.pg import start_cluster, with_database
from tests.support import ALICE, SPEAK, speak_body

USER = ALICE["X-Forwarded-Email"]


@dataclass(frozen=True)
class Sample:
    """One client's request: who answered, when its first and last bytes came."""

    worker: int
    cache: str
    first_byte: float
    done: float
    ok: bool


async def one_request(
    proxy: ProxyProcess,
    message_id: str,
    client_port: int,
    expected: bytes | None,
    all_read: asyncio.Barrier | None = None,
) -> Sample:
    """A speak call on a connection of its own from `client_port`, timed; the worker that
    answered is found once every request of the burst (`all_read`) has its answer, since
    reading /proc would hold this event loop while other answers arrive."""
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", client_port))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(
            f"{proxy.url}{SPEAK}", json=speak_body(message_id=message_id), headers=ALICE
        ) as reply:
            first = await reply.content.readany()
            first_byte = time.perf_counter()
            body = first + await reply.read()
            done = time.perf_counter()
            cache = reply.headers.get("X-TTS-Cache", "") + (
                "-collapsed" if "collapsed" in reply.headers.get("Cache-Status", "") else ""
            )
            ok = reply.status == 200 and (expected is None or body == expected)
        if all_read is not None:
            await all_read.wait()
        connection = tcp_sockets(TCP_ESTABLISHED, proxy.port, client_port)
        workers = children_of(proxy.pid) or [proxy.pid]
        worker = next((w for w in workers if socket_inodes(w) & connection), proxy.pid)
    return Sample(worker, cache, first_byte, done, ok)


def distinct_ports(count: int) -> list[int]:
    """`count` different loopback ports free now."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def owner_of(proxy: ProxyProcess, message_id: str) -> int:
    """The worker that owns a message's key (as proxy/fleet/fills.py computes it)."""
    pids = sorted(children_of(proxy.pid)) or [proxy.pid]
    key = CacheKey(USER, "t-1", message_id, "af_nicole")
    return pids[int(key.digest(), 16) % len(pids)]


async def bursts(
    proxies: list[ProxyProcess], backend: FakeLegacyBackend, rounds: int, size: int, tag: str
) -> dict[str, Any]:
    """`rounds` bursts of `size` identical requests spread over `proxies`, one key each.

    Each client's first byte after the burst's first: `own` for the clients of the key's owner
    (with replicas: of the replica that led), `other` for the rest (through the owner's socket;
    with replicas: the follower replica's clients, after the leader's whole fill)."""
    own: list[float] = []
    other: list[float] = []
    calls_before = backend.calls[SPEAK]
    failures = 0
    for round_ in range(rounds):
        message_id = f"m-burst-{tag}-{round_}"
        expected = FakeLegacyBackend.audio_for("Hello there", "af_nicole")
        targets = [proxies[n % len(proxies)] for n in range(size)]
        all_read = asyncio.Barrier(size)
        calls = [
            one_request(proxy, message_id, port, expected, all_read)
            for proxy, port in zip(targets, distinct_ports(size), strict=True)
        ]
        samples = await asyncio.gather(*calls)
        failures += sum(not s.ok for s in samples)
        earliest = min(s.first_byte for s in samples)
        leader = next(t for t, s in zip(targets, samples, strict=True) if s.first_byte == earliest)
        owner = owner_of(leader, message_id)
        for target, sample in zip(targets, samples, strict=True):
            direct = target is leader if len(proxies) > 1 else sample.worker == owner
            (own if direct else other).append(sample.first_byte - earliest)
    return {
        "syntheses_per_key": (backend.calls[SPEAK] - calls_before) / rounds,
        "own": own,
        "other": other,
        "failures": failures,
    }


async def hits_local_and_via_owner(
    proxy: ProxyProcess, backend: FakeLegacyBackend, keys: int
) -> dict[str, Any]:
    """Every key once (its owner and the asking worker hold it), then once more each on a new
    connection: a local copy's hit, or the owner's memory through its socket."""
    calls_before = backend.calls[SPEAK]
    ids = [f"m-hit-{n}" for n in range(keys)]
    for message_id in ids:
        await one_request(proxy, message_id, free_port(), None)
    local: list[float] = []
    via_owner: list[float] = []
    random.shuffle(ids)
    for message_id in ids:
        started = time.perf_counter()
        sample = await one_request(proxy, message_id, free_port(), None)
        seconds = sample.done - started
        if sample.cache == "hit":
            local.append(seconds)
        elif sample.cache == "miss-collapsed":
            via_owner.append(seconds)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/_proxy/admin/api/stats", headers=ADMIN) as reply:
            stats = json.loads(await reply.read())
    return {
        "local": local,
        "via_owner": via_owner,
        "entries": stats["tiers"]["memory"]["entries"],
        "keys": keys,
        "extra_calls": backend.calls[SPEAK] - calls_before - keys,
    }


async def followers(
    pair: list[ProxyProcess], backend: FakeLegacyBackend, rounds: int
) -> dict[str, Any]:
    """A leader on one replica, then a follower on the other once the backend was called."""
    waits: list[float] = []
    leader_ttfb: list[float] = []
    follower_ttfb: list[float] = []
    calls_before = backend.calls[SPEAK]
    for round_ in range(rounds):
        message_id = f"m-follow-{round_}"
        called = asyncio.Event()
        backend.speak_plan = lambda _body, _headers, called=called: called.set()  # type: ignore[misc]
        started = time.perf_counter()
        lead = asyncio.create_task(one_request(pair[0], message_id, free_port(), None))
        await called.wait()
        backend.speak_plan = None
        follow_started = time.perf_counter()
        follower = await one_request(pair[1], message_id, free_port(), None)
        leader = await lead
        waits.append(follower.first_byte - leader.done)
        leader_ttfb.append(leader.first_byte - started)
        follower_ttfb.append(follower.first_byte - follow_started)
    return {
        "waits": waits,
        "leader_ttfb": leader_ttfb,
        "follower_ttfb": follower_ttfb,
        "syntheses_per_key": (backend.calls[SPEAK] - calls_before) / rounds,
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its threads so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_request(proxy: ProxyProcess, misses: int, hits: int) -> dict[str, float]:
    """CPU of one proxy process per miss (a fill, its Volume write) and per memory hit."""
    async with aiohttp.ClientSession() as session:

        async def call(message_id: str) -> None:
            body = speak_body(message_id=message_id)
            async with session.post(f"{proxy.url}{SPEAK}", json=body, headers=ALICE) as reply:
                await reply.read()

        before = cpu_seconds(proxy.pid)
        for n in range(misses):
            await call(f"m-cpu-{n}")
        await asyncio.sleep(0.5)  # the last Volume writes
        middle = cpu_seconds(proxy.pid)
        for _ in range(hits):
            await call("m-cpu-0")
        after = cpu_seconds(proxy.pid)
    return {"miss": (middle - before) / misses, "hit": (after - middle) / hits}


async def run(rounds: int, size: int, keys: int) -> None:
    backend = FakeLegacyBackend()
    await backend.start()
    # A synthesis whose head comes after 300 ms, then 8 chunks 20 ms apart: every request of
    # a burst arrives while it runs, and its first byte is one event all clients wait for.
    backend.speak.headers_delay = 0.3
    backend.speak.chunk_delay = 0.02
    started: list[ProxyProcess] = []
    rows: list[str] = []
    server = start_cluster()
    quick = {"fleet.owner_timeout_seconds": 5.0}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-fills-") as tmp:
            folder = Path(tmp)
            for workers in (1, 3):
                proxy = await start(folder / f"w{workers}", backend.url, workers, **quick)
                started.append(proxy)
                result = await bursts([proxy], backend, rounds, size, f"w{workers}")
                rows += _burst_rows(
                    f"{workers} worker(s), burst of {size}",
                    result,
                    "first byte after the first, the owner's clients",
                    "first byte after the first, the other workers' clients",
                )
                await proxy.stop()
            backend.speak.headers_delay = backend.speak.chunk_delay = 0.0
            proxy = await start(folder / "cpu", backend.url, 1)
            started.append(proxy)
            cpu = await cpu_per_request(proxy, 500, 5000)
            rows.append(
                f"| 1 process: CPU per miss (fill, local Volume write) | {cpu['miss'] * 1000:.2f} "
                f"| | 500 misses, 64 KiB, from /proc/<pid>/stat |"
            )
            rows.append(
                f"| 1 process: CPU per memory hit | {cpu['hit'] * 1000:.2f} | | 5,000 hits, "
                f"64 KiB, one kept-alive connection |"
            )
            await proxy.stop()
            memory_only = {**quick, "cache.volume.kind": "none"}
            proxy = await start(folder / "hits", backend.url, 3, **memory_only)
            started.append(proxy)
            result = await hits_local_and_via_owner(proxy, backend, keys)
            rows += _hit_rows(result)
            await proxy.stop()
            backend.speak.headers_delay, backend.speak.chunk_delay = 0.3, 0.02
            dsn = with_database(server.admin_dsn, "postgres")
            shared = {**quick, "index.dsn": dsn, "cache.volume.path": str(folder / "shared")}
            replicas = [await start(folder, backend.url, 2, **shared) for _ in range(2)]
            started += replicas
            result = await bursts(replicas, backend, rounds, size, "replicas")
            rows += _burst_rows(
                f"2 replicas x 2 workers, burst of {size}",
                result,
                "first byte after the first, the leading replica's clients",
                "first byte after the first, the following replica's clients",
            )
            for proxy in replicas:
                await proxy.stop()
            pair = [await start(folder, backend.url, 1, **shared) for _ in range(2)]
            started += pair
            rows += _follow_rows(await followers(pair, backend, rounds))
    finally:
        for proxy in started:
            await proxy.stop()
        await backend.stop()
        server.remove()
    print("| what | median ms | p90 ms | notes |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))


def _burst_rows(name: str, result: dict[str, Any], own: str, other: str) -> list[str]:
    notes = f"syntheses per key {result['syntheses_per_key']:g}; failures {result['failures']}"
    rows = [
        f"| {name}: {own} | {ms(result['own'], 0.5)} | {ms(result['own'], 0.9)} | "
        f"{len(result['own'])} requests; {notes} |"
    ]
    if result["other"]:
        rows.append(
            f"| {name}: {other} | {ms(result['other'], 0.5)} | {ms(result['other'], 0.9)} | "
            f"{len(result['other'])} requests |"
        )
    return rows


def _hit_rows(result: dict[str, Any]) -> list[str]:
    held = f"memory entries {result['entries']} for {result['keys']} keys"
    return [
        f"| 3 workers, Volume off: memory hit (local copy), new connection | "
        f"{ms(result['local'], 0.5)} | {ms(result['local'], 0.9)} | "
        f"{len(result['local'])} requests; {held} |",
        f"| 3 workers, Volume off: hit through the owner's memory, new connection | "
        f"{ms(result['via_owner'], 0.5)} | {ms(result['via_owner'], 0.9)} | "
        f"{len(result['via_owner'])} requests; backend calls beyond one a key: "
        f"{result['extra_calls']} |",
    ]


def _follow_rows(result: dict[str, Any]) -> list[str]:
    per_key = f"syntheses per key {result['syntheses_per_key']:g}"
    return [
        f"| 2 replicas: follower's first byte after the leader's last | {ms(result['waits'], 0.5)}"
        f" | {ms(result['waits'], 0.9)} | {len(result['waits'])} rounds; {per_key} |",
        f"| 2 replicas: leader's time to first byte | {ms(result['leader_ttfb'], 0.5)} | "
        f"{ms(result['leader_ttfb'], 0.9)} | synthesis: head at 300 ms, 8 chunks 20 ms apart |",
        f"| 2 replicas: follower's time to first byte (from its request) | "
        f"{ms(result['follower_ttfb'], 0.5)} | {ms(result['follower_ttfb'], 0.9)} | |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_fills", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="bursts (and follows) per setup")
    parser.add_argument("--size", type=int, default=100, help="requests per burst")
    parser.add_argument("--keys", type=int, default=150, help="keys for the hit comparison")
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds, args.size, args.keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
