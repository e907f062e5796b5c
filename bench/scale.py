"""`python -m bench.scale`: start-up, the janitor and the Volume's totals as the Volume grows.

    .venv/bin/python -m bench.scale [--entries 10000,100000] [--kinds local,files,files+index]

For each size and Volume: the Volume is filled with that many entries (tiny bodies, valid
sidecars, 3 voices per message, 50 users of 20 threads each), then `python -m proxy serve` starts
on it in its own process, and the run measures: the time until /_proxy/health answers, the first
janitor run (its own duration, from its log line), one /_proxy/metrics scrape (which reports the
Volume's totals), the process's peak resident memory, and for the Files API emulator (no latency
added, the proxy's limiter opened wide so that the walk is timed, not the budget) the calls each
step made, with the time those calls take at the default budget (80 calls a second a replica).
Each Volume is measured twice: in the default configuration (no Volume budget) and with a budget
(`cache.volume.max_bytes`, far above what is stored: nothing is evicted, the janitor still has to
know every entry's size and age).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench.files_api import TOKEN, VOLUME
from bench.peers import REPO
from bench.procs import Child, Children, free_port, wait_ready_file
from proxy.config import to_toml
from proxy.speak import CacheKey
from proxy.storage.entry import Entry
from proxy.storage.layout import encode_sidecar, sidecar_name

log = logging.getLogger("bench.scale")

USERS: Final = 50
THREADS_PER_USER: Final = 20
VOICES: Final = ("af_nicole", "af_bella", "am_adam")
DEFAULT_BUDGET_CALLS_PER_SECOND: Final = 80.0
JANITOR_LINE: Final = re.compile(r"janitor run: .*, ([\d.]+)s, elected=(\w+)")
WAIT_SECONDS: Final = 900.0


def layout(base: str, count: int) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of `count` entries under `base`: each object, then its sidecar."""
    for number in range(count):
        message = number // len(VOICES)
        user = f"user{message % USERS:02d}@example.com"
        thread = f"t-{(message // USERS) % THREADS_PER_USER:02d}"
        key = CacheKey(user, thread, f"m-{message:07d}", VOICES[number % len(VOICES)])
        body = hashlib.sha256(f"{number}".encode()).digest()
        entry = Entry.build(
            body,
            content_type="audio/mpeg",
            text_sha256=hashlib.sha256(key.message_id.encode()).hexdigest(),
            provider="replicate",
            created_at=1_700_000_000.0,
        )
        name, sidecar = encode_sidecar(key, entry.meta)
        folder = f"{base}/{user}/{thread}/{key.message_id}"
        yield f"{folder}/{name}", body
        yield f"{folder}/{sidecar_name(key.voice)}", sidecar


def fill_folder(root: Path, count: int) -> None:
    """`count` entries on a local Volume at `root` (default prefix)."""
    made: set[str] = set()
    for path, data in layout(str(root / "tts_audio"), count):
        folder = path.rpartition("/")[0]
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(path, "wb") as handle:
            handle.write(data)


@dataclass
class Measured:
    """One proxy start on one Volume."""

    kind: str
    entries: int
    budget: bool
    start_seconds: float = 0.0
    janitor_seconds: float | None = None
    janitor_calls: int | None = None
    scrape_seconds: float = 0.0
    scrape_calls: int | None = None
    rss_at_start_mib: float = 0.0
    peak_rss_mib: float = 0.0
    notes: list[str] = field(default_factory=list)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every (kind, size) asked for and print one markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--entries", default="10000,100000")
    parser.add_argument("--kinds", default="local,files,files+index")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sizes = [int(n) for n in args.entries.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="tts-scale-"))
    try:
        results = asyncio.run(_measure_all(folder, sizes, kinds))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(table(results))
    return 0


async def _measure_all(folder: Path, sizes: list[int], kinds: list[str]) -> list[Measured]:
    main_task = asyncio.current_task()
    if main_task is not None:  # SIGTERM stops every process started, as Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    children = Children(folder, pin=False)
    results: list[Measured] = []
    cluster: Any = None
    try:
        for size in sizes:
            for kind in kinds:
                dsn = None
                if kind == "files+index":
                    cluster, dsn = await _fresh_database(cluster, f"scale_{size}")
                    if dsn is None:
                        log.info("no PostgreSQL binaries: %s skipped", kind)
                        continue
                for budget in (False, True):
                    log.info("%s, %d entries, budget %s", kind, size, budget)
                    measured = Measured(kind, size, budget)
                    await _measure(children, folder, measured, dsn)
                    log.info("%s", measured)
                    results.append(measured)
                    if dsn is not None:
                        cluster, dsn = await _fresh_database(cluster, f"scale_{size}_b")
    finally:
        await children.stop_all()
        if cluster is not None:
            cluster.remove()
    return results


async def _fresh_database(cluster: Any, name: str) -> tuple[Any, str | None]:
    from tests.pg import find_bindir, start_cluster, with_database

    if find_bindir() is None:
        return cluster, None
    if cluster is None:
        cluster = await asyncio.to_thread(start_cluster)
    import asyncpg

    admin = await asyncpg.connect(cluster.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return cluster, with_database(cluster.admin_dsn, name)


async def _measure(children: Children, folder: Path, measured: Measured, dsn: str | None) -> None:
    settings: dict[str, Any] = {
        "server.host": "127.0.0.1",
        "server.port": free_port(),
        "server.access_log": False,
        "upstream.url": "http://127.0.0.1:9",
        "cache.janitor_interval_seconds": 3600.0,
    }
    if measured.budget:
        settings["cache.volume.max_bytes"] = 2**50
    env: dict[str, str] = {}
    files_api = None
    volume_folder = folder / f"volume-{measured.entries}"
    if measured.kind == "local":
        if not volume_folder.exists():
            await asyncio.to_thread(fill_folder, volume_folder, measured.entries)
        settings["cache.volume.path"] = str(volume_folder)
    else:
        files_api = await _emulator(children, folder, measured.entries)
        env = {"DATABRICKS_HOST": files_api[1], "DATABRICKS_TOKEN": TOKEN}
        settings.update(
            {
                "cache.volume.kind": "databricks",
                "cache.volume.path": VOLUME,
                "cache.volume.max_concurrent_calls": 64,
                "cache.volume.max_calls_per_second": 1_000_000.0,
            }
        )
        if dsn is not None:
            settings["index.dsn"] = dsn
    config = folder / "scale.toml"
    config.write_text(to_toml(_nested(settings)))
    url = f"http://127.0.0.1:{settings['server.port']}"
    calls_before = await _calls(files_api)
    started = time.monotonic()
    command = [sys.executable, "-m", "proxy", "--log-level", "debug", "serve", "--config"]
    proxy = await children.spawn(
        "proxy", [*command, str(config)], env={**os.environ, **env}, cwd=REPO
    )
    try:
        await _healthy(url, proxy)
        measured.start_seconds = time.monotonic() - started
        measured.rss_at_start_mib = _status(proxy.pid, "VmRSS")
        measured.janitor_seconds = await _janitor_line(proxy.log_path, measured)
        calls_after_janitor = await _calls(files_api)
        if calls_before is not None and calls_after_janitor is not None:
            measured.janitor_calls = calls_after_janitor - calls_before
        scrape_started = time.monotonic()
        async with aiohttp.ClientSession() as session, session.get(f"{url}/_proxy/metrics") as r:
            await r.read()
        measured.scrape_seconds = time.monotonic() - scrape_started
        calls_after_scrape = await _calls(files_api)
        if calls_after_scrape is not None and calls_after_janitor is not None:
            measured.scrape_calls = calls_after_scrape - calls_after_janitor
        measured.peak_rss_mib = _status(proxy.pid, "VmHWM")
    finally:
        await children.stop(proxy)
        if files_api is not None:
            await children.stop(files_api[0])


async def _emulator(children: Children, folder: Path, entries: int) -> tuple[Any, str, str]:
    ready = folder / "files-api.ready"
    ready.unlink(missing_ok=True)
    argv = ["--ready-file", str(ready), "--latency", "0", "--populate", str(entries)]
    child = await children.spawn(
        "files-api", [sys.executable, "-m", "bench.files_api", *argv], cwd=REPO
    )
    ports = await wait_ready_file(child, ready, within=WAIT_SECONDS)
    return child, ports["url"], f"http://127.0.0.1:{ports['control_port']}"


async def _calls(files_api: tuple[Any, str, str] | None) -> int | None:
    if files_api is None:
        return None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{files_api[2]}/counts") as response,
    ):
        counts = await response.json()
    return sum(v for k, v in counts["calls"].items() if k != "throttled")


async def _healthy(url: str, proxy: Child) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline and proxy.running:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{url}/_proxy/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.02)
    raise RuntimeError(f"the proxy did not answer its health check:\n{proxy.log_tail()}")


async def _janitor_line(path: Path, measured: Measured) -> float | None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        text = await asyncio.to_thread(path.read_text, errors="replace")
        found = JANITOR_LINE.search(text)
        if found is not None:
            if found.group(2) != "True":
                measured.notes.append("janitor not elected")
            return float(found.group(1))
        if "janitor run failed" in text:
            measured.notes.append("janitor run failed")
            return None
        await asyncio.sleep(0.2)
    measured.notes.append("no janitor run")
    return None


def _status(pid: int, field_name: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _nested(dotted: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def table(results: list[Measured]) -> str:
    """The markdown table of every measurement."""
    lines = [
        "| Volume | entries | budget | start | janitor run | its Files API calls "
        "(at 80/s) | metrics scrape | its calls (at 80/s) | RSS at start | peak RSS |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results:
        lines.append(
            f"| {m.kind} | {m.entries:,} | {'yes' if m.budget else 'no (default)'} "
            f"| {m.start_seconds:.2f} s | {_seconds(m.janitor_seconds)} "
            f"| {_calls_text(m.janitor_calls)} | {m.scrape_seconds:.2f} s "
            f"| {_calls_text(m.scrape_calls)} | {m.rss_at_start_mib:.0f} MiB "
            f"| {m.peak_rss_mib:.0f} MiB |" + (f" {'; '.join(m.notes)}" if m.notes else "")
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _calls_text(calls: int | None) -> str:
    if calls is None:
        return "-"
    return f"{calls:,} ({calls / DEFAULT_BUDGET_CALLS_PER_SECOND:.0f} s)"


if __name__ == "__main__":
    raise SystemExit(main())
