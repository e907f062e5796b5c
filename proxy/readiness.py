"""GET /_proxy/ready: the upstream, the Volume and the index (those configured) answer, or 503."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from aiohttp import web

from proxy.storage.index import PostgresIndex
from proxy.storage.local import LocalVolume
from proxy.storage.local.io import folder_writable
from proxy.storage.tiers import Tier
from proxy.storage.volume_databricks import DatabricksVolume

CHECK_TIMEOUT_SECONDS: Final = 2.0

Check = Callable[[], Awaitable[bool]]


class Readiness:
    """Runs every configured check concurrently, each within a short timeout."""

    def __init__(
        self,
        *,
        upstream_url: str,
        session: aiohttp.ClientSession,
        volume: Tier | None = None,
        index: PostgresIndex | None = None,
        timeout_seconds: float = CHECK_TIMEOUT_SECONDS,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self._checks: dict[str, Check] = {
            "upstream": lambda: upstream_answers(session, upstream_url)
        }
        if isinstance(volume, LocalVolume):
            root = volume.root
            self._checks["volume"] = lambda: asyncio.to_thread(folder_writable, root)
        elif isinstance(volume, DatabricksVolume):
            self._checks["volume"] = volume.ping
        if index is not None:
            self._checks["index"] = index.ping

    async def check(self) -> dict[str, str]:
        """Each check's name with "ok", "down" or "timeout"."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[name]) for name in names))
        return dict(zip(names, results, strict=True))

    async def handle(self, request: web.Request) -> web.Response:
        """200 when every check passes; 503 naming the ones that did not."""
        checks = await self.check()
        failing = [name for name, result in checks.items() if result != "ok"]
        if failing:
            body = {"status": "unavailable", "failing": failing, "checks": checks}
            return web.json_response(body, status=503)
        return web.json_response({"status": "ready", "checks": checks})

    async def _run(self, check: Check) -> str:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return "ok" if await check() else "down"
        except TimeoutError:
            return "timeout"
        except Exception:
            return "down"


async def upstream_answers(session: aiohttp.ClientSession, url: str) -> bool:
    """True when the upstream answers a HEAD with any HTTP status (a 404 or a 500 is an answer)."""
    async with session.head(url, allow_redirects=False) as response:
        return response.status > 0


def readiness_session() -> aiohttp.ClientSession:
    """A small session for the upstream probe, apart from the proxy's traffic."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )
