"""The attacker's side of the resource tests, on loopback only and bounded in count and time:
raw connections that send a body slowly, event streams held open, and a normal user's timed
requests while they are held. `bench/hostile.py` runs the same at the default limits."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from tests.fakes.legacy_backend import FakeLegacyBackend

# What a refused or answered request gets within; past it the attempt counts as "timeout".
ANSWER_SECONDS = 5.0
# A stream refused after the default wait for a slot (5 s) is still answered within this.
STREAM_ANSWER_SECONDS = 10.0
SPEAK_PATH = "/api/tts/speak"
LONG_SSE = "/sse?count=100000&interval=0.5"
MIB = 1024 * 1024


async def backend_saw(backend: FakeLegacyBackend, path: str, count: int) -> None:
    """Wait (2 s at most) until `count` requests for `path` reached the backend."""
    for _ in range(200):
        if backend.calls[path] >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} reached the backend {backend.calls[path]} times, not {count}")


def parse_head(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, the (lower-cased) fields and the body of a raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body


def request_head(path: str, length: int | None, **extra: str) -> str:
    """A POST head with Content-Length (or chunked when `length` is None); `X_Real_Ip="..."`
    style keywords become headers."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    lines = [f"POST {path} HTTP/1.1", "Host: proxy", "Content-Type: application/json", framing]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


class SlowBody:
    """A POST whose body arrives one byte every `every` seconds, on a raw connection."""

    def __init__(self, port: int, path: str, *, address: str, every: float) -> None:
        self._port = port
        self._path = path
        self._address = address
        self._every = every
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.answer: bytes | None = None  # what the proxy sent before closing, if it did

    async def start(self) -> None:
        """Connect, send the head and the first byte, and keep dripping."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writer = writer
        head = request_head(self._path, 1_000_000, X_Real_Ip=self._address)
        writer.write(head.encode() + b"{")
        self._tasks = [
            asyncio.create_task(self._drip(writer)),
            asyncio.create_task(self._read(reader)),
        ]

    @property
    def status(self) -> int | None:
        """The proxy's answer to this request so far (None: still held open)."""
        return parse_head(self.answer)[0] if self.answer else None

    async def _drip(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(self._every)
                writer.write(b" ")
                await writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            self.answer = await reader.read()

    def close(self) -> None:
        """Stop dripping and drop the connection."""
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()


@dataclass
class Siege:
    """What an attacker holds against the proxy at `port`, and how the proxy answered it."""

    port: int
    bodies: list[SlowBody] = field(default_factory=list)
    streams: list[aiohttp.ClientResponse] = field(default_factory=list)
    stream_statuses: Counter[int | str] = field(default_factory=Counter)
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        # No pool limit of its own: the attacker opens as many connections as it likes.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for body in self.bodies:
            body.close()
        for stream in self.streams:
            stream.close()
        if self._session is not None:
            await self._session.close()

    async def slow_bodies(self, count: int, *, address: str, every: float = 1.0) -> None:
        """Open `count` slow request bodies from one address; wait briefly for the refusals."""
        bodies = [
            SlowBody(self.port, "/upload", address=address, every=every) for _ in range(count)
        ]
        await asyncio.gather(*(body.start() for body in bodies))
        self.bodies.extend(bodies)
        await asyncio.sleep(0.5)  # refusals come at once; held bodies get no answer

    def body_statuses(self) -> Counter[int | str]:
        """How the slow bodies were answered so far ("held": not at all)."""
        return Counter(body.status or "held" for body in self.bodies)

    async def event_streams(self, per_address: int, addresses: Sequence[str]) -> None:
        """Open `per_address` event streams from each address; returns once each is held open
        or was answered otherwise (or timed out)."""
        await asyncio.gather(
            *(self._open_stream(address) for address in addresses for _ in range(per_address))
        )

    async def _open_stream(self, address: str) -> None:
        assert self._session is not None
        headers = {"Accept": "text/event-stream", "X-Real-Ip": address}
        try:
            response = await asyncio.wait_for(
                self._session.get(f"http://127.0.0.1:{self.port}{LONG_SSE}", headers=headers),
                STREAM_ANSWER_SECONDS,
            )
        except (TimeoutError, aiohttp.ClientError):
            self.stream_statuses["timeout"] += 1
            return
        self.stream_statuses[response.status] += 1
        if response.status == 200:
            self.streams.append(response)
        else:
            response.close()


@dataclass
class UserTimings:
    """A normal user's requests while the siege held: seconds each, None for a failure."""

    get: list[float | None] = field(default_factory=list)
    speak: list[float | None] = field(default_factory=list)

    def worst(self) -> float | None:
        """The slowest request, or None when any failed."""
        every = self.get + self.speak
        if any(seconds is None for seconds in every):
            return None
        return max(s for s in every if s is not None)


async def time_normal_user(port: int, rounds: int, *, address: str, tag: str) -> UserTimings:
    """`rounds` ordinary GETs and speak misses (new messages), one after another, as a user at
    `address`; each bounded by ANSWER_SECONDS, and no round after one that failed."""
    timings = UserTimings()
    base = f"http://127.0.0.1:{port}"
    user = {"X-Real-Ip": address, "X-Forwarded-Email": f"{tag}@example.com"}
    timeout = aiohttp.ClientTimeout(total=ANSWER_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for index in range(rounds):
            timings.get.append(await _timed(session, "GET", f"{base}/echo", user, None))
            body = {
                "text": f"round {index}",
                "message_id": f"{tag}-m-{index}",
                "thread_id": f"{tag}-t",
                "save_to_volume": True,
            }
            timings.speak.append(await _timed(session, "POST", base + SPEAK_PATH, user, body))
            if timings.worst() is None:
                break
    return timings


async def _timed(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: dict[str, object] | None,
) -> float | None:
    started = time.monotonic()
    data = json.dumps(body).encode() if body is not None else None
    try:
        async with session.request(method, url, headers=headers, data=data) as response:
            await response.read()
            ok = response.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return None
    return time.monotonic() - started if ok else None


def vm_rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


async def send_oversized_frame(port: int, size: int) -> tuple[int | None, int]:
    """Open a WebSocket through the proxy on a raw socket and send one binary frame of `size`
    bytes: its head and first MiB, then (unless the proxy answered within a second) the rest,
    until the proxy stops reading. Returns the close code the proxy sent, and the bytes sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    chunk = bytes(MIB)
    # FIN + binary, masked, a 64-bit length; a zero mask leaves the payload as sent.
    writer.write(b"\x82\xff" + struct.pack("!Q", size) + b"\x00\x00\x00\x00" + chunk)
    sent = len(chunk)
    frame = asyncio.ensure_future(reader.read(4))
    # Read the answer before writing on: once the proxy closed, a write is answered by a reset,
    # which would lose the close frame still unread.
    await asyncio.wait({frame}, timeout=1.0)
    try:
        while sent < size and not frame.done():
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
        try:
            answer = await asyncio.wait_for(frame, 5)
        except (ConnectionError, TimeoutError):
            answer = b""
    finally:
        frame.cancel()
        writer.close()
    if len(answer) >= 4 and answer[0] == 0x88:  # a close frame: after two bytes, its code
        return struct.unpack("!H", answer[2:4])[0], sent
    return None, sent
