"""`python -m bench.backend`: the fake legacy backend in its own process, with a control port.

The control port answers `GET /calls` (speak calls so far) and `PUT /behaviour` (a JSON object of
SpeakBehaviour fields for the next speak calls), so the harness can count upstream calls and change
the audio size or streaming pace between scenarios without restarting anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.serving import serve_until_signal
from tests.fakes.legacy_backend import SPEAK_PATH, FakeLegacyBackend, SpeakBehaviour

BEHAVIOUR_FIELDS = frozenset(field.name for field in dataclasses.fields(SpeakBehaviour))


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the fake backend until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64 * 1024, help="audio bytes per answer")
    parser.add_argument("--chunks", type=int, default=8, help="chunks the audio is written in")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    args = parser.parse_args(argv)
    backend = BenchBackend()
    backend.speak = SpeakBehaviour(size=args.size, chunks=args.chunks, chunk_delay=args.chunk_delay)
    control = web.AppRunner(control_app(backend), access_log=None)
    trimmer: list[asyncio.Task[None]] = []

    async def start() -> dict[str, Any]:
        await backend.start()
        await control.setup()
        site = web.TCPSite(control, "127.0.0.1", 0)
        await site.start()
        trimmer.append(asyncio.create_task(_forget_bodies(backend)))
        return {"port": backend.port, "control_port": int(control.addresses[0][1])}

    async def stop() -> None:
        for task in trimmer:
            task.cancel()
        await control.cleanup()
        await backend.stop()

    return serve_until_signal(start, stop, args.ready_file)


class BenchBackend(FakeLegacyBackend):
    """The fake backend with audio that costs no CPU to make: one block, stamped per text.

    The real backend's synthesis happens elsewhere (at a TTS provider). The test fake hashes its
    audio out of 2,048 sha256 blocks per 64 KiB answer, about 1 ms of CPU on the machine the
    peers are measured on: under the miss scenario's load that was most of the direct peer's time
    to first byte, and CPU taken from whichever peer shared the core. Bodies stay distinct per
    text and voice (their first 32 bytes) and incompressible.
    """

    @staticmethod
    def audio_for(text: str, voice: str, size: int = 65536) -> bytes:
        """sha256(text|voice), then a block made once per size."""
        stamp = hashlib.sha256(f"{text}|{voice}".encode()).digest()
        return (stamp + _block(size))[:size]


@functools.cache
def _block(size: int) -> bytes:
    return FakeLegacyBackend.audio_for("bench block", "bench", size)


def control_app(backend: FakeLegacyBackend) -> web.Application:
    """The harness's view of the backend: its speak call count and behaviour."""

    async def calls(request: web.Request) -> web.Response:
        return web.json_response({"speak": backend.calls[SPEAK_PATH]})

    async def behaviour(request: web.Request) -> web.Response:
        wanted = await request.json()
        unknown = set(wanted) - BEHAVIOUR_FIELDS
        if unknown:
            return web.json_response({"unknown": sorted(unknown)}, status=400)
        backend.speak = dataclasses.replace(backend.speak, **wanted)
        return web.json_response(dataclasses.asdict(backend.speak))

    app = web.Application()
    app.router.add_get("/calls", calls)
    app.router.add_put("/behaviour", behaviour)
    return app


async def _forget_bodies(backend: FakeLegacyBackend) -> None:
    # The fake keeps every speak body and header set for tests; a long run only needs the counts.
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(1.0)
            backend.speak_bodies.clear()
            backend.speak_headers.clear()


if __name__ == "__main__":
    raise SystemExit(main())
