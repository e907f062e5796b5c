"""A miss handed to the key's owner among the workers: the owner's route, and the asker's stream.

The owner answers `POST /fleet/fills` on its socket (`OwnerRoute`) with the fill it joins or
leads for the key (or the entry its memory holds), in frames (proxy/fleet/wire.py); the asking
worker reads them as an upstream response (`ask_owner` -> `OwnerResponse`), so its own clients
join its local fill exactly as they join any fill. The owner keeps the recording (memory,
Volume, index): the asker at most copies it into its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from proxy.fill import Fill, FillBroken, FillReader
from proxy.fleet.group import SiblingServer
from proxy.fleet.wire import (
    ACCEPTED,
    BROKEN,
    DATA,
    END,
    ERROR,
    FILLS_PATH,
    HEAD,
    KEEPALIVE,
    MAX_ASK_BYTES,
    BadFrame,
    FillAsk,
    Head,
    error_payload,
    frame,
    frame_prefix,
    read_error,
)
from proxy.headers import X_TTS_PROVIDER
from proxy.storage.entry import Entry
from proxy.upstreams.base import UpstreamError
from proxy.upstreams.http import end_to_end

log = logging.getLogger(__name__)

# The owner writes a keepalive when it has been silent this share of the asker's bound.
KEEPALIVE_SHARE: Final = 0.25
_NO_TIMEOUT: Final = aiohttp.ClientTimeout(total=None)


class OwnerUnavailable(Exception):
    """The owner did not take the miss in time (gone, hung, refusing): fill it here."""


@dataclass
class OwnedFill:
    """The owner's fill a sibling's miss reads: `joined()` is known once the fill's head is."""

    fill: Fill
    reader: FillReader
    joined: Callable[[], bool]


# Join or lead the owner's fill for a sibling's miss; an Entry when memory already holds it.
FillSource = Callable[[FillAsk], Awaitable[OwnedFill | Entry]]


class OwnerRoute:
    """`POST /fleet/fills` on this worker's socket: a sibling's miss of a key this worker owns."""

    def __init__(self, source: FillSource, *, owner_timeout_seconds: float) -> None:
        self._source = source
        self._keepalive = owner_timeout_seconds * KEEPALIVE_SHARE

    def serve_on(self, server: SiblingServer) -> None:
        """Take the siblings' misses."""
        server.add_route("POST", FILLS_PATH, self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Accept at once, then stream the fill's head and body as frames."""
        length = request.content_length
        if length is None or length > MAX_ASK_BYTES:
            # The asker always sends a length; its body is a speak body, bounded by its settings.
            return web.json_response({"error": "a miss needs a length within bounds"}, status=413)
        try:
            ask = FillAsk.from_bytes(await request.content.readexactly(length))
        except (BadFrame, asyncio.IncompleteReadError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "application/octet-stream"})
        out = FrameWriter(response, self._keepalive)
        try:
            await response.prepare(request)
            await out.send(ACCEPTED)
            out.start()
            answer = await self._source(ask)
            if isinstance(answer, Entry):
                await _send_entry(out, answer)
            else:
                await _send_fill(out, answer)
            await out.stop()
            await response.write_eof()
        except ConnectionError:
            log.debug("fill for a sibling: the sibling left")  # its clients left: ours go on
        finally:
            await out.stop()
        return response


async def _send_entry(out: FrameWriter, entry: Entry) -> None:
    meta = entry.meta
    headers = [(hdrs.CONTENT_TYPE, meta.content_type), *meta.headers]
    headers.append((hdrs.CONTENT_LENGTH, str(meta.length)))
    if meta.provider and not any(name.lower() == "x-tts-provider" for name, _ in meta.headers):
        headers.append((X_TTS_PROVIDER, meta.provider))  # the asker judges it as a fill's head
    head = Head(meta.status, None, tuple(headers), None, joined=True, stored=True)
    await out.send(HEAD, head.to_bytes())
    await out.send(DATA, entry.body)
    await out.send(END)


async def _send_fill(out: FrameWriter, owned: OwnedFill) -> None:
    fill, reader = owned.fill, owned.reader
    try:
        await fill.wait_ready()
        error = fill.error
        if error is not None:
            payload = error_payload(
                error.status, error.detail, error.headers, fill.upstream_seconds
            )
            await out.send(ERROR, payload)
            return
        head = Head(
            fill.status,
            fill.reason,
            tuple(end_to_end(fill.headers).items()),
            fill.upstream_seconds,
            joined=owned.joined(),
            stored=fill.storable and fill.store_allowed,
        )
        await out.send(HEAD, head.to_bytes())
        try:
            async for chunk in reader:
                await out.send(DATA, chunk)
        except FillBroken:
            await out.send(BROKEN)
            return
        await out.send(END)
    finally:
        reader.close()


class FrameWriter:
    """Frames onto one response, one write at a time, with a keepalive whenever it is quiet."""

    def __init__(self, response: web.StreamResponse, keepalive_seconds: float) -> None:
        self._response = response
        self._every = keepalive_seconds
        self._lock = asyncio.Lock()
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def send(self, kind: bytes, payload: bytes = b"") -> None:
        """Write one frame."""
        async with self._lock:
            await self._response.write(frame(kind, payload))
            self._last = time.monotonic()

    def start(self) -> None:
        """Keep the asker told that this worker is alive until `stop`."""
        self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def stop(self) -> None:
        """Stop the keepalives."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _keep_alive(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await asyncio.sleep(max(self._last + self._every - time.monotonic(), 0.0))
                if time.monotonic() - self._last >= self._every:
                    await self.send(KEEPALIVE)


async def ask_owner(
    session: aiohttp.ClientSession, ask: FillAsk, *, timeout_seconds: float
) -> OwnerResponse:
    """The owner's answer to `ask`, read up to its head.

    OwnerUnavailable when the owner does not accept within `timeout_seconds`, or goes silent
    that long before the head (the miss is then filled here: nothing reached a client yet);
    UpstreamError when the owner's fill had no response (that is the answer).
    """
    started = time.monotonic()
    response: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            response = await session.post(
                f"http://worker{FILLS_PATH}", data=ask.to_bytes(), timeout=_NO_TIMEOUT
            )
            if response.status != 200:
                raise OwnerUnavailable(f"status {response.status}")
        reader = FrameReader(response.content, timeout_seconds)
        kind, _ = await reader.next()
        if kind != ACCEPTED:
            raise OwnerUnavailable(f"frame {kind!r} before acceptance")
        while True:
            kind, payload = await reader.next()
            if kind == HEAD:
                head = Head.from_bytes(payload)
                return OwnerResponse(response, reader, head, time.monotonic() - started)
            if kind == ERROR:
                status, detail, headers, seconds = read_error(payload)
                raise UpstreamError(status, detail, upstream_seconds=seconds, headers=headers)
            if kind != KEEPALIVE:
                raise OwnerUnavailable(f"frame {kind!r} before the head")
    except (OwnerUnavailable, UpstreamError):
        _close(response)
        raise
    except TimeoutError:
        _close(response)
        raise OwnerUnavailable(f"no answer within {timeout_seconds:g} s") from None
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError, BadFrame) as exc:
        _close(response)
        raise OwnerUnavailable(type(exc).__name__) from None
    except BaseException:
        _close(response)
        raise


def _close(response: aiohttp.ClientResponse | None) -> None:
    if response is not None:
        response.close()


class FrameReader:
    """Frames from the owner's answer, each within the bound (keepalives included)."""

    def __init__(self, content: aiohttp.StreamReader, timeout_seconds: float) -> None:
        self._content = content
        self._timeout = timeout_seconds

    async def next(self) -> tuple[bytes, bytes]:
        """The next frame's kind and payload; TimeoutError when the owner is silent too long,
        IncompleteReadError at an early end, BadFrame when it is not a frame."""
        async with asyncio.timeout(self._timeout):
            kind, length = frame_prefix(await self._content.readexactly(5))
            payload = await self._content.readexactly(length) if length else b""
        return kind, payload


class OwnerResponse:
    """The owner's fill as an upstream response: the head it sent, then its body frames."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        reader: FrameReader,
        head: Head,
        seconds: float,
    ) -> None:
        self._response = response
        self._reader = reader
        self.head = head
        self._headers: CIMultiDict[str] = CIMultiDict(head.headers)
        # The owner's own wait for its upstream when it led for this ask, else the wait here.
        self._seconds = head.upstream_seconds if head.upstream_seconds is not None else seconds
        self._ended = False

    @property
    def status(self) -> int:
        """The HTTP status of the owner's fill."""
        return self.head.status

    @property
    def reason(self) -> str | None:
        """Its reason phrase."""
        return self.head.reason

    @property
    def headers(self) -> CIMultiDict[str]:
        """Its headers (every client's view is built from them, as from any fill's)."""
        return self._headers

    @property
    def upstream_seconds(self) -> float | None:
        """How long the head took."""
        return self._seconds

    def read_buffered(self) -> bytes:
        """Nothing: the body comes in frames."""
        return b""

    def body_complete(self) -> bool:
        """Never: the body comes in frames."""
        return False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as the owner's fill reads it; UpstreamError when it broke or went silent."""
        while True:
            try:
                kind, payload = await self._reader.next()
            except TimeoutError:
                raise UpstreamError(504, "the owner of the key went silent") from None
            except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError, BadFrame):
                raise UpstreamError(502, "the owner of the key went away") from None
            if kind == DATA:
                yield payload
            elif kind == END:
                self._ended = True
                return
            elif kind == BROKEN:
                raise UpstreamError(502, "the owner's fill broke")
            elif kind != KEEPALIVE:
                raise UpstreamError(502, f"unexpected frame {kind!r} from the owner")

    def close(self) -> None:
        """Release the connection: kept for the next ask after a whole body, else closed."""
        if self._ended:
            self._response.release()
        else:
            self._response.close()
