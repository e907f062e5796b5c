"""`tts-cache-proxy purge`: through the running proxy, or with every process told, or not at all.

The command never reports success while a running proxy may still serve what it removed:

1. With `admin.token`, through the running proxy's admin API (which tells its other workers and
   replicas and says how many confirmed).
2. Otherwise, with the index configured, straight on the Volume and the index, then NOTIFY on
   PostgreSQL: every running worker and replica listens there, drops the entries and confirms.
3. Otherwise, when a proxy answers at its address, nothing is removed (its memory cannot be
   reached): exit 1, saying so. When none answers, straight on the Volume.

Exit 0 when every expected process confirmed, 1 when one did not or the proxy refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from proxy.config import Settings
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.group import new_token, process_name
from proxy.fleet.local import LocalInvalidations
from proxy.fleet.postgres import PostgresBus
from proxy.index.entries import PostgresIndex
from proxy.index.pool import index_enabled
from proxy.purge import PurgeResult, purge
from proxy.storage.scope import Scope
from proxy.storage.tiered import TieredCache
from proxy.storage.volumes import build_volume

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_NOT_CONFIRMED: Final = 1
# How long the command waits for a proxy to answer its health check.
HEALTH_SECONDS: Final = 2.0


@dataclass(frozen=True)
class PurgeOutcome:
    """What the command prints (the JSON answer on stdout, a message on stderr) and its code."""

    code: int
    answer: dict[str, Any] | None = None
    message: str = ""


class ProxyRefused(Exception):
    """The running proxy answered the purge with an error."""


def proxy_url(settings: Settings) -> str:
    """The running proxy's base URL as its settings place it (loopback for any address)."""
    host = settings.server.host
    host = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
    return f"http://{host}:{settings.server.port}"


async def run_purge(settings: Settings, scope: Scope, url: str | None = None) -> PurgeOutcome:
    """Purge `scope` as the module docstring says; `url` is the running proxy's base URL."""
    base = (url or proxy_url(settings)).rstrip("/")
    if settings.admin.token:
        try:
            answer = await _through_api(base, settings.admin.token, scope)
        except ProxyRefused as exc:
            return PurgeOutcome(EXIT_NOT_CONFIRMED, message=f"purge: {exc}; nothing was removed")
        if answer is not None:
            return _judged({"via": "admin-api", **answer})
    if index_enabled(settings.index, os.environ):
        result = await _directly(settings, scope, tell_everyone=True)
        return _judged({"via": "postgres", **result.to_json()})
    if await _proxy_answers(base):
        return PurgeOutcome(
            EXIT_NOT_CONFIRMED,
            message=(
                f"purge: a proxy answers at {base} but the command could not reach its memory "
                "(set admin.token or TTS_PROXY_ADMIN_TOKEN to purge through it, or configure "
                "the index so that every process hears purges); nothing was removed"
            ),
        )
    result = await _directly(settings, scope, tell_everyone=False)
    return PurgeOutcome(
        EXIT_OK,
        {"via": "direct", **result.to_json()},
        f"purge: no proxy answered at {base}; the Volume was purged directly",
    )


def _judged(answer: dict[str, Any]) -> PurgeOutcome:
    processes = answer.get("processes") or {}
    confirmed, expected = processes.get("confirmed"), processes.get("expected")
    if expected is not None and confirmed is not None and confirmed >= expected:
        return PurgeOutcome(EXIT_OK, answer)
    known = "an unknown number" if expected is None else str(expected)
    note = processes.get("note", "")
    return PurgeOutcome(
        EXIT_NOT_CONFIRMED,
        answer,
        f"purge: removed from the Volume and the index, but only {confirmed} of {known} "
        f"processes confirmed they dropped it{': ' + note if note else ''}",
    )


async def _through_api(base: str, token: str, scope: Scope) -> dict[str, Any] | None:
    """The admin API's answer; None when nothing listens at `base`."""
    url = f"{base}/_proxy/admin/api/entries"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.delete(url, params=scope.query(), headers=headers) as response,
        ):
            if response.status != 200:
                raise ProxyRefused(f"the proxy at {base} refused the purge: {response.status}")
            answer: dict[str, Any] = json.loads(await response.text())
            return answer
    except aiohttp.ClientConnectionError:
        log.info("no proxy answers on %s", url)
        return None


async def _proxy_answers(base: str) -> bool:
    """True when a proxy answers its health check at `base`."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_SECONDS)) as session,
            session.get(f"{base}/_proxy/health") as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _directly(settings: Settings, scope: Scope, *, tell_everyone: bool) -> PurgeResult:
    """Purge the Volume and the index from this command; with `tell_everyone`, NOTIFY every
    process listening on the index and wait for their confirmations."""
    volume_settings = settings.cache.volume
    volume = build_volume(volume_settings)
    index: PostgresIndex | None = None
    if index_enabled(settings.index, os.environ):
        index = PostgresIndex.from_settings(settings.index)
        await index.start()
    cache = TieredCache(
        None, volume, timeout_seconds=max(volume_settings.timeout_seconds, 60.0), logger=log
    )
    broadcast: Broadcast | None = None
    if tell_everyone and index is not None:
        name = process_name(new_token(), os.getpid())
        bus = PostgresBus(index.pool, process=name)  # sends and hears acks; not a listener
        await bus.start(wait_seconds=settings.index.timeout_seconds)
        broadcast = Broadcast(
            LocalInvalidations(cache, None),
            process=name,
            confirm_timeout_seconds=settings.fleet.confirm_timeout_seconds,
            bus=bus,
            serving=False,
        )
    try:
        return await purge(scope, cache=cache, flights=None, index=index, broadcast=broadcast)
    finally:
        if broadcast is not None:
            await broadcast.aclose()
        await cache.aclose()
        if index is not None:
            await index.aclose()
