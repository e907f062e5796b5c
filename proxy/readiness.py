"""GET /_proxy/ready: the upstream, the Volume and the index (those configured) answer, or 503."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from aiohttp import web

from proxy.index.entries import PostgresIndex
from proxy.storage.tiers import DurableTier

CHECK_TIMEOUT_SECONDS: Final = 2.0

# True (up), False (down), or a state in words.
Check = Callable[[], Awaitable[bool | str]]


class Readiness:
    """Runs every configured check concurrently, each within a short timeout."""

    def __init__(
        self,
        *,
        upstream_url: str,
        session: aiohttp.ClientSession,
        volume: DurableTier | None = None,
        index: PostgresIndex | None = None,
        timeout_seconds: float = CHECK_TIMEOUT_SECONDS,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self._checks: dict[str, Check] = {
            "upstream": lambda: upstream_answers(session, upstream_url)
        }
        if volume is not None:
            self._checks["volume"] = lambda: volume_ready(volume)
        if index is not None:
            self._checks["index"] = index.ping

    async def check(self) -> dict[str, str]:
        """Each check's name with "ok", "down", "timeout" or (the Volume) "breaker-open"."""
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
                answer = await check()
                return answer if isinstance(answer, str) else "ok" if answer else "down"
        except TimeoutError:
            return "timeout"
        except Exception:
            return "down"


async def volume_ready(volume: DurableTier) -> bool | str:
    """ "breaker-open" while the Volume is not being called; else whether it can be written."""
    if volume.breaker_state == "open":
        return "breaker-open"
    return await volume.ping()


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
