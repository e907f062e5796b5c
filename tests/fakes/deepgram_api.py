"""FakeDeepgramApi: Deepgram's text-to-speech REST API, as deepgram-sdk 7.x calls it, on loopback.

What it follows, and where from:
- `POST /v1/speak?model=...&encoding=...[&container=...]` with the JSON body `{"text": ...}`
  (deepgram/speak/v1/audio/raw_client.py; developers.deepgram.com/docs/tts-encoding). Auth is
  `Authorization: Token <key>` (the SDK's client wrapper), or `bearer <token>` for access tokens.
- The answer is the audio, streamed in chunks as it is synthesized (chunked transfer; optionally
  with a Content-Length), typed by the encoding: mp3 -> audio/mpeg, linear16 in wav -> audio/wav,
  opus in ogg -> audio/ogg, flac -> audio/flac, aac -> audio/aac.
- `container` must fit the encoding (developers.deepgram.com/docs/tts-container: wav or ogg,
  depending on the encoding); mp3, flac and aac take none: anything else is a 400 here.
- Errors are `{"err_code", "err_msg", "request_id"}`: 400 INVALID_QUERY_PARAMETER / UNSUPPORTED
  model, 401 INVALID_AUTH "Invalid credentials.", 429 TOO_MANY_REQUESTS (with Retry-After), 500.

Faults are injected at runtime with `inject(...)`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web

from tests.fakes.local_server import Fault, FaultyServer

CHUNK: Final = 4 * 1024
AUDIO_BYTES: Final = 24 * 1024
CONTAINERS: Final = {
    "linear16": {"wav", "none"},
    "mulaw": {"wav", "none"},
    "alaw": {"wav", "none"},
    "opus": {"ogg"},
    "mp3": set(),
    "flac": set(),
    "aac": set(),
}
CONTENT_TYPES: Final = {
    "mp3": "audio/mpeg",
    "linear16": "audio/wav",
    "mulaw": "audio/wav",
    "alaw": "audio/wav",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}
# The kinds `inject` takes.
FaultKind = Literal[
    "unauthorized",  # 401
    "throttled",  # 429 with Retry-After
    "error",  # 500
    "slow",  # the answer starts only after `delay` seconds
    "empty",  # 200 with no audio
    "cut",  # Content-Length advertised, half the audio sent, connection closed
    "cut_before",  # the same, with no byte sent at all
]


@dataclass
class RecordedSpeak:
    """One speak call the emulator received."""

    model: str | None
    encoding: str | None
    container: str | None
    text: str
    authorization: str | None
    query: dict[str, str]
    accept_encoding: str | None


class FakeDeepgramApi(FaultyServer):
    """Deepgram's `POST /v1/speak` on 127.0.0.1, with call records and fault injection."""

    def __init__(
        self,
        *,
        keys: Iterable[str] = ("dg0emulator0key00000000000000000000000001",),
        chunk_size: int = CHUNK,
        chunk_delay: float = 0.0,
        content_length: bool = False,
        echo_auth_in_errors: bool = False,
    ) -> None:
        super().__init__()
        self.keys: set[str] = set(keys)
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.content_length = content_length
        # No real server does this; it proves a server that did could not leak the key.
        self.echo_auth_in_errors = echo_auth_in_errors
        self.calls: Counter[str] = Counter()
        self.requests: list[RecordedSpeak] = []

    def add_routes(self, app: web.Application) -> None:
        """The emulated API's routes."""
        app.router.add_post("/v1/speak", self._speak)

    @staticmethod
    def audio_for(text: str, model: str, encoding: str = "mp3") -> bytes:
        """The bytes the emulator sends for `text` in `model` (deterministic, MP3-looking)."""
        seed = hashlib.sha256(f"{model}\0{encoding}\0{text}".encode()).digest()
        header = b"ID3\x04\x00\x00\x00\x00\x00\x00" if encoding == "mp3" else b"RIFF"
        frame = b"\xff\xfb\x90\x64" + seed * 13
        body = bytearray(header)
        while len(body) < AUDIO_BYTES:
            body += frame
        return bytes(body[:AUDIO_BYTES])

    async def _speak(self, request: web.Request) -> web.StreamResponse:
        self.calls["speak"] += 1
        authorization = request.headers.get("Authorization")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        query = dict(request.query)
        model, encoding = query.get("model"), query.get("encoding", "mp3")
        container = query.get("container")
        text = str(body.get("text", "")) if isinstance(body, dict) else ""
        self.requests.append(
            RecordedSpeak(
                model=model,
                encoding=query.get("encoding"),
                container=container,
                text=text,
                authorization=authorization,
                query=query,
                accept_encoding=request.headers.get("Accept-Encoding"),
            )
        )
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() not in {"token", "bearer"} or key.strip() not in self.keys:
            echo = f" (got Authorization: {authorization})" if self.echo_auth_in_errors else ""
            return _error(401, "INVALID_AUTH", "Invalid credentials." + echo)
        fault = self.fault if self.fault is not None and self.fault.take() else None
        if fault is not None:
            answered = await self._fault(fault, authorization)
            if answered is not None:
                return answered
        model = model or "aura-asteria-en"
        if not model.startswith("aura-"):
            return _error(400, "INVALID_QUERY_PARAMETER", f"No such model/version: {model}")
        if encoding not in CONTAINERS:
            return _error(400, "UNSUPPORTED_AUDIO_FORMAT", f"Unsupported encoding: {encoding}")
        if container is not None and container not in CONTAINERS[encoding]:
            return _error(
                400,
                "UNSUPPORTED_AUDIO_FORMAT",
                f"Container {container} is not supported for encoding {encoding}",
            )
        if not text.strip():
            return _error(400, "INVALID_QUERY_PARAMETER", "Text is required")
        audio = self.audio_for(text, model, encoding)
        return await self._stream(request, audio, encoding, model, fault)

    async def _stream(
        self,
        request: web.Request,
        audio: bytes,
        encoding: str,
        model: str,
        fault: Fault | None,
    ) -> web.StreamResponse:
        kind = fault.kind if fault is not None else None
        send = b"" if kind in {"empty", "cut_before"} else audio
        if kind == "cut":
            send = audio[: len(audio) // 2]
        headers = {
            "Content-Type": CONTENT_TYPES[encoding],
            "dg-model-name": model,
            "dg-char-count": str(len(audio)),
            "dg-request-id": str(uuid.uuid4()),
        }
        cut = kind in {"cut", "cut_before"}
        if cut or self.content_length or kind == "empty":
            headers["Content-Length"] = str(len(audio) if cut else len(send))
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for start in range(0, len(send), self.chunk_size):
            await response.write(send[start : start + self.chunk_size])
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if cut:
            # The length was promised; closing now is how a client learns the body is short.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def _fault(self, fault: Fault, authorization: str | None) -> web.Response | None:
        echo = f" (got Authorization: {authorization})" if self.echo_auth_in_errors else ""
        if fault.kind == "unauthorized":
            return _error(401, "INVALID_AUTH", "Invalid credentials." + echo)
        if fault.kind == "throttled":
            return _error(
                429,
                "TOO_MANY_REQUESTS",
                "Too many requests. Please try again later",
                headers={"Retry-After": str(fault.retry_after)},
            )
        if fault.kind == "error":
            return _error(500, "INTERNAL_SERVER_ERROR", "Internal server error" + echo)
        if fault.kind == "slow":
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=fault.delay)
            except TimeoutError:
                pass
        return None


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}
    return web.json_response(body, status=status, headers=headers)
