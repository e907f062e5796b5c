"""A stand-in of the legacy chat app, from its contract: FastAPI on uvicorn, chat_messages, speak.

Written from the seed plan (shared/seed/tts-volume-caching-plan.md), not from the app itself:
- `GET /health` answers `{"status": "healthy", ...}`, `GET /` a page;
- the user is the gateway's `X-Forwarded-Email`; messages live in PostgreSQL's `chat_messages`
  (`message_id`, `user_id`, `thread_id`, `content`, `metadata jsonb`), reached with the `PG*`
  variables and the app's Databricks token as the password (Lakebase);
- `POST /api/tts/speak` takes `{text, voice, provider, message_id, thread_id, save_to_volume}`
  and answers `audio/mpeg` with `X-TTS-Provider` and `X-TTS-Cache`. With `DATABRICKS_VOLUME`
  set and `save_to_volume`, it caches as the legacy app does: reads `metadata.tts_cache` for
  (message, user), downloads or synthesizes, uploads to
  `{DATABRICKS_VOLUME}/tts_audio/{user}/{thread}/{message}.mp3` and updates the metadata by
  message id alone (the legacy rule). The seed appends to the variable without a slash; this
  stand-in inserts one.

Synthesis is deterministic (`synthesize`), takes `LEGACY_SYNTH_SECONDS` (0.05), and prints one
line per call, so a test counts the calls in the output. The bundle tests copy this file to a
legacy app's folder as `app.py`: it imports nothing from the tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

AUDIO_BYTES = 24 * 1024
CHUNK = 8192
SSE_INTERVAL_SECONDS = 0.5


def synthesize(text: str, voice: str) -> bytes:
    """The audio for (text, voice): an MP3 tag, then sha256 blocks."""
    seed = f"{text}|{voice}".encode()
    blocks = bytearray(b"ID3\x04\x00\x00\x00\x00\x00\x00")
    counter = 0
    while len(blocks) < AUDIO_BYTES:
        blocks += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(blocks[:AUDIO_BYTES])


def _databricks_token() -> str:
    from databricks.sdk.core import Config

    return str(Config().authenticate()["Authorization"]).split(" ", 1)[1]


async def _password() -> str:
    return await asyncio.to_thread(_databricks_token)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The message store's pool, when the database resource is bound."""
    app.state.pool = None
    if os.environ.get("PGHOST"):
        app.state.pool = await asyncpg.create_pool(min_size=0, max_size=4, password=_password)
    print(f"legacy-app: started, volume={os.environ.get('DATABRICKS_VOLUME')}", flush=True)
    yield
    if app.state.pool is not None:
        await app.state.pool.close()
    print("legacy-app: stopped", flush=True)


app = FastAPI(title="legacy chat app (stand-in)", lifespan=lifespan)


def _user(request: Request) -> str | None:
    return request.headers.get("x-forwarded-email") or None


def _pool(request: Request) -> Any:
    if request.app.state.pool is None:
        raise HTTPException(status_code=503, detail="No database configured")
    return request.app.state.pool


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy", "timestamp": datetime.now(UTC).isoformat()}


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return "<!doctype html><title>Chat</title><h1>Chat</h1><p>The legacy chat app.</p>"


@app.get("/api/me")
async def me(request: Request) -> dict[str, Any]:
    headers = request.headers
    return {
        "email": headers.get("x-forwarded-email"),
        "user": headers.get("x-forwarded-user"),
        "has_token": bool(headers.get("x-forwarded-access-token")),
        "real_ip": headers.get("x-real-ip"),
        "request_id": headers.get("x-request-id"),
    }


@app.post("/api/chat/messages")
async def add_message(request: Request) -> dict[str, str]:
    user = _user(request)
    if user is None:
        raise HTTPException(status_code=401, detail="Not signed in")
    body = await request.json()
    message_id, thread_id = uuid.uuid4().hex, str(body["thread_id"])
    await _pool(request).execute(
        "INSERT INTO chat_messages (message_id, user_id, thread_id, content) VALUES ($1,$2,$3,$4)",
        message_id,
        user,
        thread_id,
        str(body.get("content", "")),
    )
    return {"message_id": message_id, "thread_id": thread_id}


@app.get("/api/chat/stream")
async def stream() -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        tick = 0
        while True:
            yield f"data: tick {tick}\n\n".encode()
            tick += 1
            await asyncio.sleep(SSE_INTERVAL_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream")


def _volume_path(user: str, thread_id: str, message_id: str) -> str:
    volume = os.environ["DATABRICKS_VOLUME"].rstrip("/")
    return f"{volume}/tts_audio/{user}/{thread_id}/{message_id}.mp3"


def _download(path: str) -> bytes:
    from databricks.sdk import WorkspaceClient

    with WorkspaceClient().files.download(path).contents as handle:
        return bytes(handle.read())


def _upload(path: str, audio: bytes) -> None:
    from databricks.sdk import WorkspaceClient

    WorkspaceClient().files.upload(path, io.BytesIO(audio), overwrite=True)


def _audio_response(audio: bytes, provider: str, cache: str) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(audio), CHUNK):
            yield audio[start : start + CHUNK]

    headers = {
        "Cache-Control": "no-cache",
        "Access-Control-Allow-Origin": "*",
        "Content-Length": str(len(audio)),
        "X-TTS-Provider": provider,
        "X-TTS-Cache": cache,
    }
    return StreamingResponse(chunks(), media_type="audio/mpeg", headers=headers)


@app.post("/api/tts/speak")
async def speak(request: Request) -> Response:
    body = await request.json()
    text = str(body.get("text", "")).strip()
    if not text:
        raise HTTPException(status_code=400, detail="Text is required")
    user = _user(request)
    message_id, thread_id = body.get("message_id"), body.get("thread_id")
    voice = str(body.get("voice", "af_nicole"))
    provider = str(body.get("provider", "replicate")).lower()
    can_cache = bool(
        os.environ.get("DATABRICKS_VOLUME")
        and user
        and message_id
        and thread_id
        and body.get("save_to_volume")
    )
    if can_cache:
        cached = await _pool(request).fetchval(
            "SELECT metadata->'tts_cache' FROM chat_messages WHERE message_id=$1 AND user_id=$2",
            message_id,
            user,
        )
        cached = json.loads(cached) if cached else None
        if cached and cached.get("voice") == voice:
            audio = await asyncio.to_thread(_download, cached["volume_path"])
            return _audio_response(audio, cached.get("provider", "cached"), "hit")
    await asyncio.sleep(float(os.environ.get("LEGACY_SYNTH_SECONDS", "0.05")))
    audio = synthesize(text, voice)
    print(f"legacy-app: synthesized message={message_id} voice={voice} user={user}", flush=True)
    if can_cache:
        path = _volume_path(str(user), str(thread_id), str(message_id))
        await asyncio.to_thread(_upload, path, audio)
        cache = {
            "volume_path": path,
            "voice": voice,
            "provider": provider,
            "cached_at": datetime.now(UTC).isoformat(),
        }
        await _pool(request).execute(
            "UPDATE chat_messages SET metadata = COALESCE(metadata, '{}'::jsonb) || $1::jsonb"
            " WHERE message_id = $2",
            json.dumps({"tts_cache": cache}),
            message_id,
        )
    return _audio_response(audio, provider, "miss" if can_cache else "disabled")
