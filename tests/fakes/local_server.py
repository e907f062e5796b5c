"""What the HTTP emulators share: listening on a free 127.0.0.1 port, and counted faults."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web


class LocalServer:
    """An aiohttp app on a free 127.0.0.1 port; `add_routes` says what it answers.

    `_stopping` is set by `stop()`: answers held back on purpose (slow faults) wait on it, so
    stopping never waits for them.
    """

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._stopping = asyncio.Event()

    def add_routes(self, app: web.Application) -> None:
        """Register the emulated API's routes."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        """Listen on a free 127.0.0.1 port."""
        self._stopping = asyncio.Event()
        app = web.Application()
        self.add_routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Release held-back answers and stop listening."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@dataclass
class Fault:
    """An injected failure (`kind`, named by each emulator) for the next `remaining` calls
    (None: every one)."""

    kind: str
    remaining: int | None = 1
    delay: float = 5.0
    retry_after: int = 1

    def take(self) -> bool:
        """True when the fault applies to this call; counts it down."""
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


class FaultyServer(LocalServer):
    """A LocalServer whose next calls can be made to fail (`inject`), one kind at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.fault: Fault | None = None

    def inject(self, kind: str, *, times: int | None = 1, **options: Any) -> None:
        """Fail the next `times` calls (None: all of them) as `kind` says."""
        self.fault = Fault(kind, times, **options)

    def clear_faults(self) -> None:
        """Answer normally again."""
        self.fault = None
