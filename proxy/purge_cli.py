"""`tts-cache-proxy purge`: through the running proxy's admin API, or straight on the Volume."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import aiohttp

from proxy.config import Settings
from proxy.purge import PurgeResult, PurgeScope, purge
from proxy.storage.index import PostgresIndex, index_enabled
from proxy.storage.local import LocalVolume
from proxy.storage.tiered import TieredCache
from proxy.storage.tiers import Tier
from proxy.storage.volume_databricks import DatabricksVolume

log = logging.getLogger(__name__)


async def run_purge(settings: Settings, scope: PurgeScope) -> dict[str, Any]:
    """Purge `scope` through the running proxy (its memory too), else the Volume and index."""
    if settings.admin.token:
        answer = await _through_api(settings, scope)
        if answer is not None:
            return {"via": "admin-api", **answer}
    result = await _directly(settings, scope)
    return {"via": "direct", **result.to_json()}


async def _through_api(settings: Settings, scope: PurgeScope) -> dict[str, Any] | None:
    host = settings.server.host
    host = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
    query = {"all": "true"} if scope.everything else {}
    for name, value in (
        ("user", scope.user),
        ("thread", scope.thread_id),
        ("message", scope.message_id),
        ("voice", scope.voice),
    ):
        if value is not None:
            query[name] = value
    url = f"http://{host}:{settings.server.port}/_proxy/admin/api/entries"
    headers = {"Authorization": f"Bearer {settings.admin.token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.delete(url, params=query, headers=headers) as response,
        ):
            if response.status != 200:
                raise RuntimeError(f"the proxy refused the purge: {response.status}")
            answer: dict[str, Any] = json.loads(await response.text())
            return answer
    except aiohttp.ClientConnectionError:
        log.info("no proxy answers on %s: purging the Volume and index directly", url)
        return None


async def _directly(settings: Settings, scope: PurgeScope) -> PurgeResult:
    volume_settings = settings.cache.volume
    volume: Tier | None = None
    if volume_settings.kind == "local":
        volume = LocalVolume(volume_settings.path, volume_settings.prefix)
    elif volume_settings.kind == "databricks":
        volume = DatabricksVolume(volume_settings)
    index: PostgresIndex | None = None
    if index_enabled(settings.index, os.environ):
        index = PostgresIndex.from_settings(settings.index)
        await index.start()
    cache = TieredCache(
        None, volume, timeout_seconds=max(volume_settings.timeout_seconds, 60.0), logger=log
    )
    try:
        return await purge(scope, cache=cache, flights=None, index=index)
    finally:
        await cache.aclose()
        if index is not None:
            await index.aclose()
