"""Hostile clients against the proxy at its default limits, on loopback: a normal user's latency
while an attacker holds the most it may, and the proxy's memory after an oversized WebSocket frame.

    .venv/bin/python -m bench.hostile [--rounds 20] [--proxy-source PATH]

The fake legacy backend runs in this process; the proxy (`python -m proxy serve`, default limits)
runs as a child. In turn:
 1. a normal user's ordinary GET and speak miss, `--rounds` times, with nothing else going on;
 2. 210 request bodies from one address, a byte a second, and 210 event streams from seven
    addresses (30 each), the attack issue 15 describes;
 3. the same user's rounds while those are held, each request bounded by 5 s;
 4. one 300 MiB WebSocket frame through the proxy; its VmRSS before and after.
`--proxy-source` runs another revision's proxy package (e.g. a `git archive` of the base) with
the same steps, for a before-and-after.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Children, child_environment, free_port, rss_bytes, wait_http
from proxy.config import to_toml
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.security.attacker import (
    MIB,
    Siege,
    UserTimings,
    send_oversized_frame,
    time_normal_user,
)

REPO = Path(__file__).resolve().parent.parent
SLOW_BODIES = 210
STREAMERS = [f"203.0.113.{n}" for n in range(1, 8)]
STREAMS_EACH = 30
FRAME_BYTES = 300 * MIB


def main(argv: Sequence[str] | None = None) -> int:
    """Run the four steps and print the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=20, help="GET + speak rounds per step")
    parser.add_argument("--proxy-source", type=Path, default=REPO, help="the proxy to run")
    args = parser.parse_args(argv)
    # The fake backend's handlers see the proxy cut the attack's connections: not news here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    asyncio.run(run(args.rounds, args.proxy_source.resolve()))
    return 0


async def run(rounds: int, source: Path) -> None:
    """The steps, against a proxy built from `source`."""
    backend = FakeLegacyBackend()
    await backend.start()
    with tempfile.TemporaryDirectory(prefix="hostile-") as scratch:
        folder = Path(scratch)
        children = Children(folder, pin=False)
        try:
            port = free_port()
            config = folder / "proxy.toml"
            settings = {
                "server": {"port": port, "access_log": False},
                "upstream": {"url": backend.url},
                "cache": {"volume": {"path": str(folder / "volume")}},
            }
            config.write_text(to_toml(settings))
            argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
            env = child_environment(PYTHONPATH=str(source))
            proxy = await children.spawn("proxy", argv, env=env, cwd=source)
            await wait_http(proxy, f"http://127.0.0.1:{port}/_proxy/health")
            print(f"proxy from {source}, pid {proxy.pid}, default limits")

            quiet = await time_normal_user(port, rounds, address="198.51.100.7", tag="quiet")
            report("1. a normal user, nothing else going on", quiet)
            async with Siege(port) as siege:
                await siege.slow_bodies(SLOW_BODIES, address="203.0.113.66")
                await siege.event_streams(STREAMS_EACH, STREAMERS)
                print(f"2. slow bodies from one address: {dict(siege.body_statuses())}")
                print(f"   event streams from 7 addresses: {dict(siege.stream_statuses)}")
                print(f"   reached the backend: {backend.calls['/upload']} bodies")
                held = await time_normal_user(port, rounds, address="198.51.100.8", tag="held")
                report("3. the same user while they are held", held)
            before = rss_bytes(proxy.pid)
            close_code, sent = await send_oversized_frame(port, FRAME_BYTES)
            await asyncio.sleep(0.5)
            after = rss_bytes(proxy.pid)
            print(
                f"4. a {FRAME_BYTES // MIB} MiB WebSocket frame: close code {close_code}, "
                f"{sent // MIB} MiB sent before the proxy stopped reading; VmRSS "
                f"{before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after"
            )
        finally:
            await children.stop_all()
            await backend.stop()


def report(title: str, timings: UserTimings) -> None:
    """One line per kind of request: how many were served, median and worst latency."""
    print(title)
    for kind, seconds in (("GET /echo", timings.get), ("speak miss", timings.speak)):
        served = [s for s in seconds if s is not None]
        if not served:
            print(f"   {kind}: none served ({len(seconds)} tried, each given 5 s)")
            continue
        median = statistics.median(served) * 1000
        print(
            f"   {kind}: {len(served)}/{len(seconds)} served, median {median:.1f} ms, "
            f"worst {max(served) * 1000:.1f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
