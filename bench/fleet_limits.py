"""`python -m bench.fleet_limits`: what the fleet asks of PostgreSQL, measured on a real one.

Starts a throwaway PostgreSQL as the tests do, restarts it with durability back on (`fsync`,
`synchronous_commit`, `full_page_writes`: the tests switch them off), and measures, with the
proxy's own classes and statements:

- **the index's write rate**: misses recorded as a replica with fleet fills records them (a
  fill lease taken, the entry's row written, the lease given back: three statements), by
  `--writers` concurrent tasks on one pool of 10 connections, for `--seconds`;
- **NOTIFY's delivery**: `--listeners` sessions LISTEN on one channel (as every worker of every
  replica does), `--senders` sessions send stored notices as fast as they can (1 KiB each, the
  size of a busy process's batch): messages per second delivered to every listener, and the time
  from a NOTIFY to its last delivery.

Prints a Markdown table (docs/scaling.md reads it). On this machine, not on Lakebase: a
managed PostgreSQL across a network adds its round trip (1-2 ms in a region) to each statement.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import asyncpg

from proxy.index.entries import PostgresIndex
from proxy.index.fill_leases import FillLeases, flight_name
from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from tests.pg import PostgresServer, start_cluster, with_database

PAYLOAD_BYTES = 1024


def durable(server: PostgresServer) -> None:
    """Restart the tests' cluster without their speed options: fsync, full page writes and
    synchronous commits back on, as in production (the options are on its command line, which
    no ALTER SYSTEM overrides)."""
    server.stop()
    assert server.bindir is not None
    root = server.data_dir.parent
    options = f"-p {server.port} -c listen_addresses=127.0.0.1 -k {root}"
    pg_ctl = [*server.run_as, str(server.bindir / "pg_ctl"), "-D", str(server.data_dir)]
    log = str(root / "postgres.log")
    subprocess.run(
        [*pg_ctl, "-l", log, "-o", options, "-w", "-t", "30", "start"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server.running = True


async def check_durable(dsn: str) -> None:
    """Refuse to measure a cluster that does not sync its commits."""
    con = await asyncpg.connect(dsn)
    try:
        rows = await con.fetch(
            "SELECT name, setting FROM pg_settings"
            " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')"
        )
    finally:
        await con.close()
    if any(row["setting"] != "on" for row in rows):
        raise RuntimeError(f"durability is off: {[tuple(row) for row in rows]}")


async def index_writes(dsn: str, writers: int, seconds: float) -> tuple[float, list[float]]:
    """Misses recorded per second (lease, row, release), and each one's time."""
    index = PostgresIndex(dsn, timeout_seconds=5.0, pool_max_size=10)
    await index.start()
    leases = FillLeases(index.pool, holder="bench")
    entry = Entry.build(b"x" * 1024, content_type="audio/mpeg", text_sha256="a" * 64, provider=None)
    times: list[float] = []
    deadline = time.monotonic() + seconds

    async def writer(number: int) -> None:
        count = 0
        while time.monotonic() < deadline:
            key = CacheKey("bench@example.com", f"t-{number}", f"m-{count}", "af_nicole")
            count += 1
            started = time.perf_counter()
            flight = flight_name(key, entry.meta.text_sha256, None)
            await leases.take(flight)
            await index.record(key, entry.meta, f"/Volumes/x/{number}/{count}.mp3")
            await leases.release(flight)
            times.append(time.perf_counter() - started)

    try:
        await asyncio.gather(*(writer(n) for n in range(writers)))
    finally:
        await index.aclose()
    return len(times) / seconds, times


async def notify_delivery(
    dsn: str, listeners: int, senders: int, messages: int
) -> tuple[float, list[float]]:
    """Messages per second every listener received, and each message's time to its last one."""
    sent_at: dict[int, float] = {}
    last_at: dict[int, float] = {}
    received = [0] * listeners
    done = asyncio.Event()
    sessions = [await asyncpg.connect(dsn) for _ in range(listeners)]

    def on_notice(index: int) -> object:
        def handle(_con: object, _pid: int, _channel: str, payload: str) -> None:
            number = int(payload.split(":", 1)[0])
            last_at[number] = time.perf_counter()
            received[index] += 1
            if all(count >= messages for count in received):
                done.set()

        return handle

    for index, session in enumerate(sessions):
        await session.add_listener("bench_fleet", on_notice(index))  # type: ignore[arg-type]
    connections = [await asyncpg.connect(dsn) for _ in range(senders)]
    padding = "x" * PAYLOAD_BYTES

    async def send(sender: asyncpg.Connection, numbers: range) -> None:
        for number in numbers:
            sent_at[number] = time.perf_counter()
            await sender.execute("SELECT pg_notify('bench_fleet', $1)", f"{number}:{padding}")

    started = time.perf_counter()
    try:
        await asyncio.gather(
            *(send(c, range(n, messages, senders)) for n, c in enumerate(connections))
        )
        await asyncio.wait_for(done.wait(), timeout=120)
        elapsed = time.perf_counter() - started
    finally:
        for session in [*sessions, *connections]:
            await session.close()
    delays = [last_at[n] - sent_at[n] for n in range(messages)]
    return messages / elapsed, delays


def ms(values: Sequence[float], fraction: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000:.1f}"


async def run(writers: int, seconds: float, listeners: int, senders: int, messages: int) -> None:
    server = start_cluster()
    try:
        durable(server)
        dsn = with_database(server.admin_dsn, "postgres")
        await check_durable(dsn)
        rate, times = await index_writes(dsn, writers, seconds)
        delivered, delays = await notify_delivery(dsn, listeners, senders, messages)
    finally:
        server.remove()
    print("| what | rate | median ms | p90 ms | notes |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(
        f"| misses recorded (lease taken, row written, lease given back) | {rate:,.0f}/s | "
        f"{ms(times, 0.5)} | {ms(times, 0.9)} | {writers} concurrent, pool of 10, "
        f"{len(times)} in {seconds:g} s, fsync on |"
    )
    print(
        f"| stored notices delivered to every listener | {delivered:,.0f}/s | "
        f"{ms(delays, 0.5)} | {ms(delays, 0.9)} | {listeners} listeners, {messages} NOTIFY of "
        f"{PAYLOAD_BYTES} B from {senders} sessions ({delivered * listeners:,.0f} deliveries/s); "
        f"time: NOTIFY to the last listener (mean {statistics.mean(delays) * 1000:.1f} ms) |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_limits", description=__doc__)
    parser.add_argument("--writers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--listeners", type=int, default=32)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args(argv)
    asyncio.run(run(args.writers, args.seconds, args.listeners, args.senders, args.messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
