"""An origin on a raw socket that sends the bytes a test scripts, which aiohttp's server would not.

Also the client side of such tests: reading response heads off a raw connection, so that interim
(1xx) responses are seen as they arrive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

HEAD_WAIT_SECONDS = 5.0

# A scripted answer: bytes to write, or an event to wait for before writing the rest.
Step = bytes | asyncio.Event


class RawOrigin:
    """Answers each request with `answer` (or `answers[n]` for the nth request); counts
    connections and requests, and keeps each connection open until the peer closes it."""

    def __init__(self, *answers: Sequence[Step]) -> None:
        self._answers = answers
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if b"expect: 100-continue" in head.lower():
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await reader.readexactly(_content_length(head))
                answer = self._answers[min(len(self.requests), len(self._answers)) - 1]
                for step in answer:
                    if isinstance(step, asyncio.Event):
                        await writer.drain()
                        await step.wait()
                    else:
                        writer.write(step)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


@dataclass
class Head:
    """A response head as read off the wire."""

    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The first value of header `name`, or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def read_head(reader: asyncio.StreamReader) -> Head:
    """The next response head on a raw connection, within HEAD_WAIT_SECONDS."""
    async with asyncio.timeout(HEAD_WAIT_SECONDS):
        raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")[:-2]
    _, status, *reason = status_line.split(" ", 2)
    headers = [(name, value.strip()) for name, value in (line.split(":", 1) for line in lines)]
    return Head(int(status), reason[0] if reason else "", headers)


async def send(
    host_port: tuple[str, int], request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw connection and write `request` on it."""
    reader, writer = await asyncio.open_connection(*host_port)
    writer.write(request)
    await writer.drain()
    return reader, writer


def _content_length(head: bytes) -> int:
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0
