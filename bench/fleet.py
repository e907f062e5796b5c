"""`python -m bench.fleet`: what crossing processes costs: a purge's confirmation, a scrape's sum.

Starts the fake legacy backend, then `serve --workers N` groups (and, for replicas, a throwaway
PostgreSQL as the tests start it), and measures:

- a purge through the admin API while every process holds the entry in memory: the time until
  every process confirmed (`processes.seconds` in the answer) and the client's whole request;
- GET /_proxy/metrics: one process alone, then one worker summing N workers' samples.

Prints a Markdown table (docs/scaling.md has the figures and how to read them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import PROXY_MODULE, ProxyProcess, free_port, spawn_proxy, toml_for
from tests.fakes import FakeLegacyBackend
from tests.pg import start_cluster, with_database
from tests.support import ALICE, SPEAK, TOKEN, speak_body

ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def start(folder: Path, backend: str, workers: int, **settings: Any) -> ProxyProcess:
    """A healthy `serve --workers N` (N = 1: one process) in `folder`."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    port = free_port()
    values = {
        "server.port": port,
        "server.access_log": False,
        "upstream.url": backend,
        "cache.volume.path": str(folder / "volume"),
        "admin.token": TOKEN,
        **settings,
    }
    config = folder / f"proxy-{port}.toml"
    config.write_text(toml_for(values))
    argv = ["serve", "--config", str(config)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    proxy = await spawn_proxy(folder, argv, port=port, command=PROXY_MODULE)
    await proxy.wait_healthy()
    await asyncio.sleep(0.5)  # every worker up, not only the first
    return proxy


async def warm(proxies: list[ProxyProcess], requests: int) -> None:
    """Speak calls on new connections, so the kernel spreads them over every worker."""
    for proxy in proxies:
        for _ in range(requests):
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{proxy.url}{SPEAK}", json=speak_body(), headers=ALICE) as reply,
            ):
                await reply.read()


async def purges(proxies: list[ProxyProcess], rounds: int, warm_requests: int) -> dict[str, Any]:
    """Purge through the first proxy `rounds` times, each with the entry in every memory."""
    confirm: list[float] = []
    total: list[float] = []
    counts: set[tuple[int, int]] = set()
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            await warm(proxies, warm_requests)
            started = time.perf_counter()
            async with session.delete(
                f"{proxies[0].url}/_proxy/admin/api/entries",
                params={"user": ALICE["X-Forwarded-Email"]},
                headers=ADMIN,
            ) as reply:
                answer = json.loads(await reply.read())
            total.append(time.perf_counter() - started)
            if "processes" not in answer:
                raise RuntimeError(f"{reply.status} {answer}\n{proxies[0].log()[-3000:]}")
            processes = answer["processes"]
            confirm.append(processes["seconds"])
            counts.add((processes["confirmed"], processes["expected"]))
    return {"confirm": confirm, "total": total, "counts": sorted(counts)}


async def scrapes(proxy: ProxyProcess, count: int) -> list[float]:
    """`count` scrapes on one kept-alive connection (one worker answers, summing the rest)."""
    times: list[float] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.get(f"{proxy.url}/_proxy/metrics") as reply:
                await reply.read()
                assert reply.status == 200, reply.status
            times.append(time.perf_counter() - started)
    return times


def ms(values: Sequence[float], fraction: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000:.1f}"


async def run(rounds: int, scrape_count: int) -> None:
    backend = FakeLegacyBackend()
    await backend.start()
    started: list[ProxyProcess] = []
    rows: list[str] = []
    server = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            folder = Path(tmp)
            for workers in (1, 2, 3, 4):
                proxy = await start(folder / f"w{workers}", backend.url, workers)
                started.append(proxy)
                times = await scrapes(proxy, scrape_count)
                rows.append(
                    f"| scrape, {workers} worker(s) | {ms(times, 0.5)} | {ms(times, 0.9)} | "
                    f"{len(times)} scrapes |"
                )
                if workers > 1:
                    result = await purges([proxy], rounds, warm_requests=4 * workers)
                    rows.append(_purge_row(f"purge, {workers} workers, sockets", result))
                await proxy.stop()
            dsn = with_database(server.admin_dsn, "postgres")
            shared = {"index.dsn": dsn, "cache.volume.path": str(folder / "shared")}
            pair = [await start(folder, backend.url, 2, **shared) for _ in range(2)]
            started += pair
            result = await purges(pair, rounds, warm_requests=8)
            rows.append(_purge_row("purge, 2 replicas x 2 workers, PostgreSQL", result))
    finally:
        for proxy in started:
            await proxy.stop()
        await backend.stop()
        server.remove()
    print("| what | median ms | p90 ms | notes |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))


def _purge_row(name: str, result: dict[str, Any]) -> str:
    counts = ", ".join(f"{c}/{e}" for c, e in result["counts"])
    return (
        f"| {name}: confirmed | {ms(result['confirm'], 0.5)} | {ms(result['confirm'], 0.9)} | "
        f"confirmed/expected {counts}; whole request {ms(result['total'], 0.5)} ms median |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="purges per configuration")
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes per configuration")
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds, args.scrapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
