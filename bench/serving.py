"""What the harness's helper servers share: run on uvloop until SIGTERM, announce the ports."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.cli import new_event_loop

Start = Callable[[], Awaitable[dict[str, Any]]]
Stop = Callable[[], Awaitable[None]]


def serve_until_signal(start: Start, stop: Stop, ready_file: Path) -> int:
    """Run `start` on the proxy's event loop, write its ports to `ready_file`, wait for SIGTERM."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(start, stop, ready_file))
    return 0


async def _serve(start: Start, stop: Stop, ready_file: Path) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)
    try:
        ports = await start()
        # Written then renamed, so the harness never reads half a file.
        partial = ready_file.with_suffix(".partial")
        partial.write_text(json.dumps(ports) + "\n")
        partial.rename(ready_file)
        await done.wait()
    finally:
        await stop()
