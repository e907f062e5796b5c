"""`python -m bench.files_api`: the Databricks Files API emulator with added latency, on its own.

The seed-style peer reads its Volume through it, as the legacy design read the Volume on every
replay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.serving import serve_until_signal

VOLUME = "/Volumes/main/default/tts"
TOKEN = "dapi-bench-token"


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the emulator until SIGTERM."""
    from tests.fakes.files_api import FilesApiEmulator

    parser = argparse.ArgumentParser(prog="python -m bench.files_api", description=__doc__)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=0.030, help="seconds added per call")
    args = parser.parse_args(argv)
    emulator = FilesApiEmulator(volumes=[VOLUME], tokens=[TOKEN])
    emulator.latency = args.latency
    trimmer: list[asyncio.Task[None]] = []

    async def start() -> dict[str, Any]:
        await emulator.start()
        trimmer.append(asyncio.create_task(_forget_requests(emulator)))
        return {"url": emulator.url}

    async def stop() -> None:
        for task in trimmer:
            task.cancel()
        await emulator.stop()

    return serve_until_signal(start, stop, args.ready_file)


async def _forget_requests(emulator: Any) -> None:
    # The emulator records every request for tests; a long run would only grow.
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            await asyncio.sleep(1.0)
            emulator.requests.clear()
            emulator.calls.clear()


if __name__ == "__main__":
    raise SystemExit(main())
