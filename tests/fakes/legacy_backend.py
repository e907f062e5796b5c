"""FakeLegacyBackend: the legacy FastAPI backend's contract as a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMsgType, web
from multidict import CIMultiDict

SPEAK_PATH: Final = "/api/tts/speak"
DOWNLOAD_CHUNK: Final = 64 * 1024
GZIP_PLAIN: Final = b"".join(b"line %d of a compressible text body\n" % i for i in range(2000))
GZIP_BODY: Final = gzip.compress(GZIP_PLAIN, mtime=0)
WS_CLOSE_PREFIX: Final = "close:"
WS_SEND_PREFIX: Final = "send:"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SpeakBehaviour:
    """How the fake answers the next speak calls; tests change it between requests."""

    status: int = 200
    content_type: str = "audio/mpeg"
    provider: str | None = None
    chunks: int = 8
    chunk_delay: float = 0.0
    headers_delay: float = 0.0
    truncate: bool = False
    chunked: bool = False
    size: int = 64 * 1024
    # Mix the caller and message into the audio, so bytes name exactly whom they were made for.
    per_request: bool = False
    # Headers added to (or replacing) the answer's own, e.g. Set-Cookie or CORS.
    extra_headers: dict[str, str] = field(default_factory=dict)
    # A stand-in: audio in this voice, labelled as the backend's provider fallback labels it.
    fallback_voice: str | None = None
    # Reset the connection (RST): before the status line, or, with `truncate`, after half the body.
    reset: bool = False


# Chooses one speak call's behaviour from its JSON body and headers; None: the fake's `speak`.
SpeakPlan = Callable[[dict[str, Any], CIMultiDict[str]], SpeakBehaviour | None]


class FakeLegacyBackend:
    """The legacy backend: the speak contract and pass-through test routes, on 127.0.0.1."""

    GZIP_PLAIN: Final = GZIP_PLAIN
    GZIP_BODY: Final = GZIP_BODY

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.speak_bodies: list[dict[str, Any]] = []
        self.speak_headers: list[CIMultiDict[str]] = []
        self.speak = SpeakBehaviour()
        self.speak_plan: SpeakPlan | None = None
        # time.monotonic() when each SSE event was written, for timing assertions.
        self.sse_sent: list[float] = []
        # The close code each WebSocket ended with, as the backend saw it.
        self.ws_close_codes: list[int | None] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT."""
        if self._port is None:
            raise RuntimeError("FakeLegacyBackend is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        """The bound port."""
        if self._port is None:
            raise RuntimeError("FakeLegacyBackend is not started")
        return self._port

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        self._runner = web.AppRunner(self._app(), shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        address = self._runner.addresses[0]
        self._port = int(address[1])

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def request_salt(user: str, thread_id: str, message_id: str, voice: str) -> str:
        """What per-request audio is made from besides the text (see SpeakBehaviour)."""
        return f"{user}|{thread_id}|{message_id}|{voice}"

    @staticmethod
    def audio_for(text: str, voice: str, size: int = 65536) -> bytes:
        """The bytes the fake synthesizes for (text, voice): sha256 blocks under a counter."""
        seed = f"{text}|{voice}".encode()
        blocks = bytearray()
        counter = 0
        while len(blocks) < size:
            blocks += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return bytes(blocks[:size])

    @staticmethod
    def download_chunks(size: int) -> Iterator[bytes]:
        """The deterministic bytes /download?size=N streams, in 64 KiB chunks."""
        base = FakeLegacyBackend.audio_for("download", "block", DOWNLOAD_CHUNK)
        sent = 0
        index = 0
        while sent < size:
            chunk = (index.to_bytes(8, "big") + base[8:])[: size - sent]
            yield chunk
            sent += len(chunk)
            index += 1

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=1024**3)
        app.router.add_post(SPEAK_PATH, self._speak)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_route("*", "/echo/{tail:.*}", self._echo)
        app.router.add_get("/cookies", self._cookies)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/download", self._download)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_get("/sse", self._sse)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/slow", self._slow)
        app.router.add_route("*", "/status/{code:\\d+}", self._status)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.calls[request.path] += 1
        return await handler(request)

    async def _speak(self, request: web.Request) -> web.StreamResponse:
        try:
            document = json.loads(await request.read())
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            return _error(422, "request body must be a JSON object")
        headers = CIMultiDict(request.headers)
        self.speak_bodies.append(document)
        self.speak_headers.append(headers)
        planned = self.speak_plan(document, headers) if self.speak_plan is not None else None
        behaviour = planned or self.speak
        text = str(document.get("text") or "").strip()
        if not text:
            return _error(400, "Text is required")
        if behaviour.headers_delay:
            await asyncio.sleep(behaviour.headers_delay)
        if behaviour.reset and not behaviour.truncate:
            _reset(request)
            raise asyncio.CancelledError
        if behaviour.status != 200:
            detail = f"TTS failed with all providers: fake {behaviour.status}"
            return _error(behaviour.status, detail)
        voice = behaviour.fallback_voice or str(document.get("voice") or "af_nicole")
        requested = str(document.get("provider") or "replicate").lower()
        if behaviour.per_request:
            voice_salt = self.request_salt(
                request.headers.get("X-Forwarded-Email", ""),
                str(document.get("thread_id")),
                str(document.get("message_id")),
                voice,
            )
            audio = self.audio_for(text, voice_salt, behaviour.size)
        else:
            audio = self.audio_for(text, voice, behaviour.size)
        response = web.StreamResponse(
            headers={
                "Content-Type": behaviour.content_type,
                "Cache-Control": "no-cache",
                "Access-Control-Allow-Origin": "*",
                "X-TTS-Provider": behaviour.provider or requested,
                "X-TTS-Cache": "disabled",
                **behaviour.extra_headers,
            }
        )
        if behaviour.fallback_voice is not None:
            response.headers["X-TTS-Fallback"] = "provider, voice"
        if behaviour.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(audio)
        body = audio[: len(audio) // 2] if behaviour.truncate else audio
        try:
            await response.prepare(request)
            for index, chunk in enumerate(_split(body, behaviour.chunks)):
                if index and behaviour.chunk_delay:
                    await asyncio.sleep(behaviour.chunk_delay)
                await response.write(chunk)
        except ConnectionResetError:  # the proxy went away mid-body
            return response
        if behaviour.truncate:
            # close() flushes what was written, then the peer sees the body end early; a reset
            # drops what is still unsent.
            if behaviour.reset:
                _reset(request)
            elif request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        await response.write_eof()
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "path": request.rel_url.raw_path,
                "raw_path": request.raw_path,
                "query_string": request.rel_url.raw_query_string,
                "headers": [[name, value] for name, value in request.headers.items()],
                "body_sha256": digest.hexdigest(),
                "body_length": length,
            }
        )

    async def _cookies(self, request: web.Request) -> web.Response:
        response = web.Response(text="cookies")
        response.headers.add("Set-Cookie", "session=abc; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "theme=dark; Path=/")
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/echo"})

    async def _gzip(self, request: web.Request) -> web.Response:
        return web.Response(
            body=GZIP_BODY,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        # aiohttp would write a StreamResponse's body even to a HEAD request.
        chunks = self.download_chunks(size) if request.method != "HEAD" else iter(())
        with contextlib.suppress(ConnectionResetError):  # the client went away
            for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(DOWNLOAD_CHUNK):
            digest.update(chunk)
            length += len(chunk)
        return web.json_response({"length": length, "sha256": digest.hexdigest()})

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("count", "3"))
        interval = float(request.query.get("interval", "0.1"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            for index in range(count):
                if index:
                    await asyncio.sleep(interval)
                self.sse_sent.append(time.monotonic())
                await response.write(f"id: {index}\ndata: event {index}\n\n".encode())
            await response.write_eof()
        return response

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if message.data.startswith(WS_CLOSE_PREFIX):
                    await ws.close(code=int(message.data[len(WS_CLOSE_PREFIX) :]))
                    break
                if message.data.startswith(WS_SEND_PREFIX):  # "send:N": N bytes, binary
                    await ws.send_bytes(b"\x5a" * int(message.data[len(WS_SEND_PREFIX) :]))
                    continue
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        self.ws_close_codes.append(ws.close_code)
        return ws

    async def _slow(self, request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "1"))
        await asyncio.sleep(delay)
        return web.json_response({"slept": delay})

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in {204, 304}:
            return web.Response(status=code)
        return _error(code, f"status {code}")


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset (linger 0), not an orderly close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _error(status: int, detail: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


def _split(body: bytes, pieces: int) -> Iterator[bytes]:
    step = max(1, -(-len(body) // max(1, pieces)))
    for start in range(0, len(body), step):
        yield body[start : start + step]
