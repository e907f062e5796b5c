"""The stop's bound: requests still running when `server.shutdown_timeout_seconds` passes are cut.

aiohttp's runner waits the timeout for handlers to finish, then asks them to stop and waits the
timeout again for a handler that does not notice (a relayed event stream, a WebSocket, a long
download): twice the bound. Every route's handler task is known here, and the ones still running
when the bound passes are cancelled, so the process exits within the bound it was given.
"""

from __future__ import annotations

import asyncio
import functools

from aiohttp import web

from proxy.request_context import Handler


class Drain:
    """The handler tasks in flight, cancelled `seconds` after the stop begins."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._running: set[asyncio.Task[None]] = set()
        self._deadline: asyncio.TimerHandle | None = None

    def guard(self, handler: Handler) -> Handler:
        """`handler`, its task known while it runs."""
        running = self._running

        @functools.wraps(handler)
        async def tracked(request: web.Request) -> web.StreamResponse:
            task = request.task
            running.add(task)
            try:
                return await handler(request)
            finally:
                running.discard(task)

        return tracked

    async def on_shutdown(self, app: web.Application) -> None:
        """From the start of the stop: cancel whatever still runs when the bound passes."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._seconds, self.cut)

    def cut(self) -> None:
        """Cancel every handler still running (their responses end, their clients see it)."""
        for task in list(self._running):
            task.cancel()

    async def on_cleanup(self, app: web.Application) -> None:
        """The stop is over: no cancellation left pending."""
        if self._deadline is not None:
            self._deadline.cancel()
