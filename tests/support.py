"""Helpers for the operator-view tests: speak calls, a proxy served with its access logger."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.access_log import access_log_options
from proxy.app import create_app
from proxy.config import Settings
from proxy.state import CACHE, FLIGHTS

SPEAK = "/api/tts/speak"
ALICE = {"X-Forwarded-Email": "alice@example.com"}
BOB = {"X-Forwarded-Email": "bob@example.com"}
TOKEN = "s3cret-admin-token-of-32-characters"

ProxyClient = TestClient[web.Request, web.Application]


def speak_body(**change: Any) -> dict[str, Any]:
    """A cacheable speak body (Alice's first message unless changed)."""
    base: dict[str, Any] = {
        "text": "Hello there",
        "voice": "af_nicole",
        "message_id": "m-1",
        "thread_id": "t-1",
        "save_to_volume": True,
    }
    base.update(change)
    return base


async def settle(app: web.Application, within: float = 5.0) -> None:
    """Wait until the proxy's fills have ended, then until their Volume writes are done.

    A client can read a miss's last byte before the fill sees its upstream's end (the chunked
    terminator may come in a later packet) and stores the entry: draining the cache alone could
    come before the write is even scheduled.
    """
    flights = app.get(FLIGHTS)
    for _ in range(int(within / 0.005)):
        if flights is None or not len(flights):
            break
        await asyncio.sleep(0.005)
    await app[CACHE].drain()


@dataclass(frozen=True)
class Spoken:
    """What a speak call answered."""

    status: int
    cache: str | None
    tier: str | None
    request_id: str | None
    body: bytes


async def speak(
    session: aiohttp.ClientSession | ProxyClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Spoken:
    """POST a speak body and read the whole answer."""
    async with session.post(url, json=body, headers=ALICE if headers is None else headers) as r:
        data = await r.read()
        return Spoken(
            r.status,
            r.headers.get("X-TTS-Cache"),
            r.headers.get("X-TTS-Cache-Tier"),
            r.headers.get("X-Request-Id"),
            data,
        )


async def logged_client(aiohttp_server: Any, aiohttp_client: Any, settings: Settings) -> Any:
    """A client of the proxy served the way the CLI serves it: with the JSON access logger."""
    server: TestServer = await aiohttp_server(
        create_app(settings), **access_log_options(settings, standalone=False)
    )
    return await aiohttp_client(server)
