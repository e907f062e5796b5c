"""A small HTTP/1.1 client for speak misses: the request leaves in the caller's turn of the loop.

aiohttp's client writes a request body from a task of its own on Python < 3.12, so a miss's
request left the proxy one turn of the event loop after it was ready (0.2 ms idle, more under
load), on top of ~0.1 ms of request building. This client writes the head and body with one
`transport.write` in the caller's turn and parses the response with httptools (llhttp, the
parser Node.js uses). It keeps a pool of keep-alive connections to one origin.

What it does not do, because speak misses never need it: redirects, cookies, proxies,
compression, request bodies that are not bytes. Everything else still goes through aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstreams.base import UpstreamError

# Headers this client writes itself; any copy in the caller's headers is dropped.
OWN_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# An idle connection older than this is closed rather than reused: servers close idle
# keep-alive connections after a few seconds (uvicorn: 5), and a request written on a connection
# the server is closing at that moment is lost.
IDLE_SECONDS: Final = 4.0
# Body bytes buffered unread before the socket stops being read (and read again below half).
HIGH_WATER: Final = 1024 * 1024


class H1Error(UpstreamError):
    """The exchange failed: a 504 for a timeout, else a 502 naming what went wrong underneath."""

    def __init__(self, problem: str, *, cause: str, timeout: bool = False) -> None:
        if timeout:
            super().__init__(504, "upstream timed out")
        else:
            super().__init__(502, f"upstream unavailable ({cause})")
        self.problem = problem
        self.timeout = timeout


class _StaleConnection(H1Error):
    """A reused connection closed before any byte of the response: the request can be retried."""


class H1Response:
    """A response whose body is read as it arrives; close() returns the connection to the pool."""

    def __init__(
        self, connection: _Connection, status: int, reason: str, headers: CIMultiDict[str]
    ):
        self._connection = connection
        self.status = status
        self.reason: str | None = reason
        self.headers = CIMultiDictProxy(headers)

    def read_buffered(self) -> bytes:
        """The body bytes already received, without waiting (may be empty)."""
        return self._connection.take_buffered()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises H1Error when it ends before its framing says."""
        connection = self._connection
        while True:
            chunk = await connection.next_chunk()
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        """Done with the response: a connection that finished it cleanly is kept for reuse."""
        self._connection.release()


class _Connection(asyncio.Protocol):
    """One connection: one exchange at a time, parsed by httptools."""

    def __init__(self, pool: H1Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._reset_exchange()
        self._closed = False

    def _reset_exchange(self) -> None:
        self._head: asyncio.Future[H1Response] | None = None
        self._reason = b""
        self._header_pairs: list[tuple[bytes, bytes]] = []
        self._interim = False
        self._got_bytes = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._keep_alive = False
        self._until_close = False
        self._error: H1Error | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._released = False
        self._stray = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None or self._complete:
            # Bytes nobody asked for (before a request, or past a finished answer): whatever
            # they are, this connection can no longer be trusted to frame the next answer.
            self._stray = True
            self._abort()
            return
        self._got_bytes = True
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(H1Error(f"malformed response: {exc}", cause="HttpParserError"))
            self._abort()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost tells what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._pool.forget(self)
        head = self._head
        if head is None or self._complete or self._error is not None:
            return  # idle, finished or already failed
        if not head.done():
            cause = type(exc).__name__ if exc is not None else "ServerDisconnectedError"
            error = _StaleConnection if not self._got_bytes else H1Error
            self._fail(error("upstream closed the connection", cause=cause))
        elif self._until_close:
            self._complete = True  # a body without framing ends with the connection
            self._cancel_timer()
            self._wake()
        else:
            self._fail(
                H1Error("upstream closed the connection mid-body", cause="ClientPayloadError")
            )

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            self._stray = True  # a second answer in the bytes of the first

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_pairs.append((name, value))

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue and the like: the answer comes after it
            self._header_pairs.clear()
            self._reason = b""
            return
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in self._header_pairs
        )
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._until_close = not (chunked or "content-length" in headers or status in (204, 304))
        response = H1Response(self, status, self._reason.decode("latin-1").strip(), headers)
        if self._head is not None and not self._head.done():
            self._head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._interim or self._stray:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._stray:
            return
        if self._interim:
            self._interim = False
            return
        self._complete = True
        # Only valid inside this callback (llhttp resets for the next message afterwards).
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # The exchange

    def send(self, data: bytes, body: bytes) -> asyncio.Future[H1Response]:
        """Write the request; the future gets the response head."""
        assert self.transport is not None
        self._reset_exchange()
        head: asyncio.Future[H1Response] = self._loop.create_future()
        self._head = head
        self._last_read = self._loop.time()
        if body:
            self.transport.write(data + body)
        else:
            self.transport.write(data)
        self._arm_timer()
        return head

    def take_buffered(self) -> bytes:
        if not self._chunks:
            return b""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._consumed(len(data))
        return data

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._consumed(len(chunk))
        return chunk

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        reusable = (
            self._complete
            and self._error is None
            and not self._chunks
            and not self._until_close
            and not self._closed
            and not self._stray
            and self._keep_alive
        )
        if reusable:
            self.idle_since = self._loop.time()
            self._pool.put_back(self)
        else:
            self._abort()
        self._pool.done()

    def discard(self) -> None:
        """Drop a connection whose exchange failed or was abandoned before its response."""
        self._released = True
        self._cancel_timer()
        self._abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def _consumed(self, size: int) -> None:
        self._buffered -= size
        if self._paused and self._buffered <= HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self._last_read = self._loop.time()
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: H1Error) -> None:
        if self._error is None:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._cancel_timer()
        self._wake()

    # The read timeout: no byte for read_timeout seconds while a response is awaited.

    def _arm_timer(self) -> None:
        timeout = self._pool.read_timeout
        if timeout is not None and timeout > 0:
            self._timer = self._loop.call_at(self._last_read + timeout, self._check_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timer(self) -> None:
        self._timer = None
        if self._complete or self._error is not None or self._released:
            return
        timeout = self._pool.read_timeout
        assert timeout is not None
        if self._paused or self._loop.time() - self._last_read < timeout:
            if self._paused:
                self._last_read = self._loop.time()  # waiting for our reader is not silence
            self._arm_timer()
            return
        self._fail(H1Error("upstream timed out", timeout=True, cause="TimeoutError"))
        self._abort()


class H1Pool:
    """Keep-alive connections to one origin, at most `limit` exchanges at a time."""

    def __init__(
        self,
        origin: URL,
        *,
        limit: int,
        connect_timeout: float | None,
        read_timeout: float | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if origin.scheme not in ("http", "https") or origin.host is None:
            raise ValueError(f"not an http(s) origin: {origin}")
        self._host = origin.host
        self._port = origin.port or (443 if origin.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if origin.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        default_port = 443 if origin.scheme == "https" else 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == default_port else f"{host}:{self._port}"
        self.read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> H1Response:
        """Send one request; the response's head is back, its body streams after."""
        if self._closed:
            raise H1Error("client closed", cause="ClientClosed")
        data = self._head_bytes(method, target, headers, body)
        await self._slots.acquire()
        try:
            while True:
                connection, reused = self._take_idle()
                if connection is None:
                    connection = await self._connect()
                try:
                    return await connection.send(data, body)
                except _StaleConnection:
                    connection.discard()
                    if not reused:
                        raise
                    # The server closed a kept-alive connection before a byte of its answer:
                    # closing it for idleness, it never read ours. Sent again, on another one.
                except BaseException:
                    connection.discard()
                    raise
        except BaseException:
            self._slots.release()
            raise

    def put_back(self, connection: _Connection) -> None:
        """A connection that finished its exchange cleanly."""
        if self._closed:
            connection.close()
            return
        self._idle.append(connection)

    def done(self) -> None:
        """An exchange ended (its response was closed)."""
        self._slots.release()

    def forget(self, connection: _Connection) -> None:
        """A connection closed."""
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    async def aclose(self) -> None:
        """Close every connection."""
        self._closed = True
        for connection in list(self._all):
            connection.close()
        self._idle.clear()
        await asyncio.sleep(0)

    def _take_idle(self) -> tuple[_Connection | None, bool]:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if transport is None or transport.is_closing():
                continue
            if now - connection.idle_since > IDLE_SECONDS:
                connection.close()
                continue
            return connection, True
        return None, False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            # Not a 504: the upstream never got the request (as config/default.toml says).
            raise H1Error("upstream connect timed out", cause="ConnectionTimeoutError") from exc
        except OSError as exc:
            raise H1Error(f"cannot connect to upstream: {exc}", cause=type(exc).__name__) from exc
        self._all.add(protocol)
        return protocol

    def _head_bytes(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers:
            if name.lower() in OWN_HEADERS:
                continue
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value or ":" in name:
                raise H1Error(f"invalid header {name!r}", cause="InvalidHeader")
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        if any(c in target for c in " \r\n"):
            raise H1Error("invalid request target", cause="InvalidURL")
        return "".join(lines).encode("utf-8", "surrogateescape")
