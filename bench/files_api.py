"""`python -m bench.files_api`: the Databricks Files API emulator with added latency, on its own.

The seed-style peer reads its Volume through it, as the legacy design read the Volume on every
replay; the production replay reads and writes it with the workspace's budget (`--max-concurrent`,
`--max-per-second`). The control port answers `GET /counts`: the calls so far by kind, the calls
answered 429 and the most calls at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.serving import serve_until_signal

VOLUME = "/Volumes/main/default/tts"
TOKEN = "dapi-bench-token"
SIDECAR_SUFFIX = ".meta.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the emulator until SIGTERM."""
    from tests.fakes.files_api import FilesApiEmulator

    parser = argparse.ArgumentParser(prog="python -m bench.files_api", description=__doc__)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=0.030, help="seconds added per call")
    parser.add_argument("--max-concurrent", type=int, help="calls at once before 429")
    parser.add_argument("--max-per-second", type=int, help="calls per second before 429")
    parser.add_argument(
        "--populate", type=int, default=0, help="entries stored before it listens (bench.scale)"
    )
    args = parser.parse_args(argv)
    emulator = _listed_emulator(FilesApiEmulator)(
        volumes=[VOLUME],
        tokens=[TOKEN],
        max_concurrent=args.max_concurrent,
        max_per_second=args.max_per_second,
    )
    if args.populate:
        populate(emulator, args.populate)
    emulator.latency = args.latency
    counts = CallCounts()
    control = web.AppRunner(control_app(emulator, counts), access_log=None)
    trimmer: list[asyncio.Task[None]] = []

    async def start() -> dict[str, Any]:
        await emulator.start()
        await control.setup()
        site = web.TCPSite(control, "127.0.0.1", 0)
        await site.start()
        trimmer.append(asyncio.create_task(_forget_requests(emulator, counts)))
        return {"url": emulator.url, "control_port": int(control.addresses[0][1])}

    async def stop() -> None:
        for task in trimmer:
            task.cancel()
        await control.cleanup()
        await emulator.stop()

    return serve_until_signal(start, stop, args.ready_file)


def _listed_emulator(base: type[Any]) -> type[Any]:
    """The emulator with its folder listings indexed: the test emulator lists a folder by
    reading every path it holds, which a Volume of 100,000 entries makes quadratic."""

    class Listed(base):  # type: ignore[misc, valid-type]
        _listing: dict[str, list[tuple[str, bool]]] | None = None

        async def _dispatch(self, request: web.Request) -> web.StreamResponse:
            if request.method not in ("GET", "HEAD"):
                self._listing = None  # anything else may change the tree
            return await super()._dispatch(request)

        def _children(self, path: str) -> list[tuple[str, bool]]:
            if self._listing is None:
                listing: dict[str, dict[str, bool]] = {}
                for folder in self.directories:
                    parent, _, name = folder.rpartition("/")
                    listing.setdefault(parent, {})[name] = True
                for file_path in self.files:
                    parent, _, name = file_path.rpartition("/")
                    listing.setdefault(parent, {})[name] = False
                self._listing = {k: sorted(v.items()) for k, v in listing.items()}
            return list(self._listing.get(path, ()))

    return Listed


def populate(emulator: Any, count: int) -> None:
    """`count` entries of the bench.scale layout, written straight into the emulator."""
    from bench.scale import layout

    for path, data in layout(f"{VOLUME}/tts_audio", count):
        emulator.write(path, data)


class CallCounts:
    """Files API calls by kind, kept while the emulator's own records are trimmed."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()

    def take(self, emulator: Any) -> None:
        """Count the emulator's recorded requests, then let it forget them."""
        for record in emulator.requests:
            if record.endpoint in ("oauth", "metadata"):
                continue
            self.kinds[_kind(record.method, record.endpoint, record.path, record.status)] += 1
        emulator.requests.clear()
        emulator.calls.clear()


def _kind(method: str, endpoint: str, path: str, status: int | None) -> str:
    if status == 429:
        return "throttled"
    if endpoint == "directories":
        return "listing" if method == "GET" else f"directory {method}"
    what = "sidecar" if path.endswith(SIDECAR_SUFFIX) else "object"
    return f"{method} {what}"


def control_app(emulator: Any, counts: CallCounts) -> web.Application:
    """The harness's view of the emulator: its calls by kind, the 429s, the most at once."""

    async def report(request: web.Request) -> web.Response:
        counts.take(emulator)
        return web.json_response(
            {
                "calls": dict(counts.kinds),
                "over_limit": emulator.over_limit,
                "max_in_flight": emulator.max_in_flight,
            }
        )

    app = web.Application()
    app.router.add_get("/counts", report)
    return app


async def _forget_requests(emulator: Any, counts: CallCounts) -> None:
    # The emulator records every request for tests; a long run would only grow.
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(1.0)
            counts.take(emulator)


if __name__ == "__main__":
    raise SystemExit(main())
