"""FakeOpenAISpeech: an OpenAI-compatible `POST /v1/audio/speech` on loopback, counting calls.

It answers as the API does: a bearer key it knows, a JSON body with `model`, `input` and `voice`
(400 otherwise, 401 for an unknown key), and the audio streamed in chunks (chunked transfer, no
Content-Length) in the `response_format` asked for. The bytes depend on every field that changes
the audio and on nothing else, so a test can tell which call made what it got. `GET /v1/models`
stands for the rest of the API, which the proxy passes through.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from typing import Any, Final

from aiohttp import web

from tests.fakes.local_server import LocalServer

SPEECH_PATH: Final = "/v1/audio/speech"
CONTENT_TYPES: Final = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


class FakeOpenAISpeech(LocalServer):
    """The speech endpoint of an OpenAI-compatible API; `calls` counts speech requests."""

    def __init__(self, keys: tuple[str, ...] = ("sk-alice", "sk-bob")) -> None:
        super().__init__()
        self.keys = set(keys)
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: Counter[str] = Counter()
        self.chunks = 8
        self.chunk_delay = 0.0
        self.size = 32 * 1024

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(SPEECH_PATH, self._speech)
        app.router.add_get("/v1/models", self._models)

    @staticmethod
    def audio_for(body: dict[str, Any], size: int = 32 * 1024) -> bytes:
        """The bytes made for a speech body: from its text, voice, model, format, speed and
        instructions, the API's defaults applied."""
        fields = {
            "input": body["input"],
            "voice": body["voice"],
            "model": body["model"],
            "response_format": body.get("response_format", "mp3"),
            "speed": float(body.get("speed", 1.0)),
            "instructions": body.get("instructions"),
        }
        seed = json.dumps(fields, sort_keys=True).encode()
        blocks = bytearray()
        counter = 0
        while len(blocks) < size:
            blocks += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return bytes(blocks[:size])

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        authorization = request.headers.get("Authorization", "")
        self.authorizations[authorization] += 1
        if authorization.removeprefix("Bearer ") not in self.keys:
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", None)
        self.bodies.append(body)
        missing = [name for name in ("model", "input", "voice") if name not in body]
        if missing:
            return _error(400, f"Missing required parameter: '{missing[0]}'.", None)
        audio_format = body.get("response_format", "mp3")
        if audio_format not in CONTENT_TYPES:
            return _error(400, f"Invalid value: '{audio_format}'.", None)
        audio = self.audio_for(body, self.size)
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[audio_format]})
        response.enable_chunked_encoding()
        await response.prepare(request)
        step = -(-len(audio) // self.chunks)
        for start in range(0, len(audio), step):
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await response.write(audio[start : start + step])
        await response.write_eof()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in self.keys:
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini-tts"}]})


def _error(status: int, message: str, code: str | None) -> web.Response:
    """The API's error body."""
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return web.json_response({"error": error}, status=status)
