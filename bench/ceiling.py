"""`python -m bench.ceiling`: the bare aiohttp handler no Python proxy can beat.

It reads the JSON body, parses it, and answers prebuilt bytes with the seven headers a cache hit
carries, on the proxy's event loop (uvloop), without an access log.

The bytes are audio of the kind the fake backend makes, not `bytes(size)`: a large zeroed bytes
object is calloc'ed from fresh pages that all map the kernel's one zero page, so sending it reads
the same 4 KiB over and over from the CPU cache. That made a 1 MiB ceiling ~19% faster than any
server holding real audio (measured with wrk: 315 vs 380 us of CPU per request).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.serving import serve_until_signal
from bench.workload import SPEAK_PATH
from tests.fakes import FakeLegacyBackend


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the ceiling until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64 * 1024, help="audio bytes per answer")
    args = parser.parse_args(argv)
    runner = web.AppRunner(ceiling_app(args.size), access_log=None)

    async def start() -> dict[str, Any]:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return {"port": int(runner.addresses[0][1])}

    return serve_until_signal(start, runner.cleanup, args.ready_file)


def ceiling_app(size: int) -> web.Application:
    """POST {SPEAK_PATH}: parse the JSON body, answer `size` prebuilt bytes."""
    audio = FakeLegacyBackend.audio_for("the ceiling's audio", "af_nicole", size)
    headers = {
        "Content-Type": "audio/mpeg",
        "ETag": f'"{hashlib.sha256(audio).hexdigest()[:32]}"',
        "X-TTS-Cache": "hit",
        "X-TTS-Cache-Tier": "memory",
        "Cache-Status": "tts-cache-proxy; hit; detail=memory",
        "Content-Location": "/_proxy/audio/t-bench/m-bench/af_nicole",
        "X-TTS-Provider": "replicate",
    }

    async def speak(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=audio, headers=headers)

    app = web.Application()
    app.router.add_post(SPEAK_PATH, speak)
    return app


if __name__ == "__main__":
    raise SystemExit(main())
