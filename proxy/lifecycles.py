"""The app's parts that open and close with it (aiohttp cleanup contexts), in start order."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.admin.api import AdminApi
from proxy.admin.dashboard import Dashboard
from proxy.admin.entries import EntryBrowser
from proxy.admin.entry_pages import EntryPages
from proxy.admin.history import History
from proxy.admin.pages import AdminPages
from proxy.admin.routes import ADMIN_GUARD, DASHBOARD, ENTRY_PAGES
from proxy.config import IndexSettings, Settings
from proxy.contracts import speak_contracts
from proxy.fleet.group import SiblingServer
from proxy.fleet.setup import (
    after_volume_write,
    fleet_fills,
    group_view,
    serve_group,
    start_broadcast,
)
from proxy.fleet.view import Sampler
from proxy.index.backfill import IndexBackfill
from proxy.index.coverage import VolumeCoverage
from proxy.index.entries import PostgresIndex
from proxy.index.legacy import LegacyMessages
from proxy.index.lookup import IndexLookup
from proxy.index.pool import index_enabled
from proxy.index.recorder import EntryRecorder
from proxy.index.rotating_password import RotatingPassword
from proxy.janitor import Janitor
from proxy.limits import SlottedUpstream, UpstreamSlots
from proxy.metrics import Metrics
from proxy.ownership import OwnershipCheck
from proxy.policy import Admission
from proxy.readiness import Readiness, readiness_session
from proxy.routes.audio import AudioUrl
from proxy.routes.passthrough import Passthrough, PassthroughLimits
from proxy.routes.speak import SpeakHandler
from proxy.state import (
    ADMIN_API,
    AUDIO_URL,
    BACKFILL,
    BROADCAST,
    CACHE,
    DISK_GUARD,
    ENTRY_BROWSER,
    FLEET_FILLS,
    FLIGHTS,
    GROUP,
    GROUP_VIEW,
    HISTORY,
    IDENTITY,
    INDEX,
    INDEX_LOOKUP,
    JANITOR,
    LEGACY,
    METRICS,
    PASSTHROUGH,
    READINESS,
    RECORDER,
    SETTINGS,
    SLOTS,
    SPEAK_HANDLER,
    SPEAK_ROUTE,
    STATS,
    SYNTHESIZER,
    UPSTREAM,
    VOLUME,
    get_state,
)
from proxy.storage.disk import DiskGuard
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import WRITE_DELAY_SECONDS, TieredCache
from proxy.storage.tiers import DurableTier
from proxy.storage.volumes import backstop_seconds, build_volume
from proxy.upstreams.http import HttpUpstream, client_session
from proxy.upstreams.provider_setup import build_synthesizer

log = logging.getLogger(__name__)


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = get_state(app, SETTINGS)
    session = client_session(settings.upstream)
    upstream = app[UPSTREAM] = HttpUpstream(settings.upstream, session, stats=app[STATS])
    slots = app[SLOTS] = UpstreamSlots(settings.upstream, app[STATS])
    limits = PassthroughLimits.from_settings(settings, slots, app[STATS])
    app[PASSTHROUGH] = Passthrough(upstream, session, limits)
    chain = build_synthesizer(settings, session)
    if chain is not None:
        app[SYNTHESIZER] = chain
    yield
    if chain is not None:
        await chain.aclose()
    await session.close()


async def cache_tiers(app: web.Application) -> AsyncIterator[None]:
    settings = get_state(app, SETTINGS)
    cache_settings = settings.cache
    memory = MemoryTier(
        max_bytes=cache_settings.memory.max_bytes,
        ttl_seconds=cache_settings.memory.ttl_seconds,
        max_entry_bytes=cache_settings.max_entry_bytes,
    )
    volume = build_volume(cache_settings.volume)
    cleanup: asyncio.Task[int] | None = None
    if volume is not None:
        app[VOLUME] = volume
        cleanup = asyncio.create_task(volume.clean_leftovers())
    index = app.get(INDEX)
    recorder = None
    if index is not None and volume is not None:
        recorder = app[RECORDER] = _recorder(app, settings, volume, index)
        recorder.start()
    after_write = None
    if volume is not None:
        after_write = after_volume_write(lambda: app.get(BROADCAST), recorder)
    app[CACHE] = TieredCache(
        memory,
        volume,
        timeout_seconds=backstop_seconds(cache_settings.volume),
        logger=log,
        after_volume_write=after_write,
        write_delay_seconds=WRITE_DELAY_SECONDS,
    )
    yield
    if cleanup is not None and not cleanup.done():
        cleanup.cancel()
    await get_state(app, FLIGHTS).aclose()
    await app[CACHE].aclose()
    if recorder is not None:
        await recorder.aclose()  # after the cache: its last writes' rows


async def postgres_index(app: web.Application) -> AsyncIterator[None]:
    settings = get_state(app, SETTINGS).index
    if not index_enabled(settings, os.environ):
        if settings.verify_ownership:
            log.warning("index.verify_ownership is on without an index: nothing will be cached")
        yield
        return
    index = PostgresIndex.from_settings(
        settings, password=settings.password or None, token=_lakebase_token(settings)
    )
    await index.start()
    app[INDEX] = index
    app[LEGACY] = LegacyMessages(index.pool, ownership_query=settings.ownership_query)
    yield
    await index.aclose()


def _lakebase_token(settings: IndexSettings) -> RotatingPassword | None:
    """The app's OAuth token, refreshed ahead of expiry, with `password_from = "databricks"`."""
    if settings.password_from != "databricks":
        return None
    from proxy.index.lakebase import lakebase_password

    return lakebase_password()


def _recorder(
    app: web.Application, settings: Settings, volume: DurableTier, index: PostgresIndex
) -> EntryRecorder:
    """After a Volume write: the index row, and the legacy metadata where configured; with
    lookups through the index, the coverage its gaps withdraw and the walk that restores it."""
    legacy = app[LEGACY] if settings.index.write_legacy_metadata else None
    recorder = EntryRecorder(index, volume, legacy=legacy)
    lookup = IndexLookup.build(
        settings.cache.volume, volume, index, app[STATS].index_lookups, recorder.unrecorded
    )
    if lookup is not None:
        app[INDEX_LOOKUP] = lookup
        recorder.coverage = VolumeCoverage(index.pool, lookup.volume)
        if volume.walkable:
            app[BACKFILL] = IndexBackfill(volume, index, recorder.coverage)
    return recorder


async def fleet(app: web.Application) -> AsyncIterator[None]:
    """Invalidations to and from the other workers (their sockets) and replicas (PostgreSQL)."""
    settings, cache, flights = get_state(app, SETTINGS), get_state(app, CACHE), app[FLIGHTS]
    index = app.get(INDEX)
    broadcast = app[BROADCAST] = await start_broadcast(
        settings, cache=cache, flights=flights, group=app.get(GROUP), index=index
    )
    fills = fleet_fills(
        settings, cache=cache, flights=flights, stats=app[STATS], broadcast=broadcast, index=index
    )
    if fills is not None:  # one fill per key across workers and replicas
        app[FLEET_FILLS] = fills
    yield
    if fills is not None:
        await fills.aclose()
    await broadcast.aclose()


async def sibling_server(app: web.Application) -> AsyncIterator[None]:
    """This worker's socket in the group's folder: invalidations in, its numbers out, the
    fills of its keys."""
    server = SiblingServer(get_state(app, GROUP))
    serve_group(server, get_state(app, BROADCAST), app[GROUP_VIEW], app.get(FLEET_FILLS))
    await server.start()
    yield
    await server.aclose()


async def housekeeping(app: web.Application) -> AsyncIterator[None]:
    settings = get_state(app, SETTINGS)
    guard = DiskGuard.from_settings(settings.cache.volume)
    await guard.refresh()  # a real answer before the first request
    app[DISK_GUARD] = guard
    janitor = Janitor(
        settings.cache,
        get_state(app, CACHE),
        app.get(VOLUME),
        app.get(INDEX),
        backfill=app.get(BACKFILL),
    )
    app[JANITOR] = janitor
    janitor.start()
    yield
    await janitor.aclose()
    await guard.aclose()


async def handlers(app: web.Application) -> AsyncIterator[None]:
    settings = get_state(app, SETTINGS)
    upstream = get_state(app, UPSTREAM)
    ownership = (
        OwnershipCheck(app.get(LEGACY), cache_seconds=settings.index.ownership_cache_seconds)
        if settings.index.verify_ownership
        else None
    )
    app[SPEAK_HANDLER] = app[SPEAK_ROUTE].target = SpeakHandler(
        settings=settings,
        identity=app[IDENTITY],
        cache=get_state(app, CACHE),
        flights=app[FLIGHTS],
        passthrough=app[PASSTHROUGH],
        # Speak misses hold an ordinary upstream slot, as any other request does.
        synthesizer=SlottedUpstream(app.get(SYNTHESIZER, upstream), app[SLOTS]),
        direct=SlottedUpstream(upstream, app[SLOTS]),
        stats=app[STATS],
        index=app.get(INDEX),
        index_lookup=app.get(INDEX_LOOKUP),
        ownership=ownership,
        admission=Admission(min_uses=settings.cache.min_uses),
        disk_guard=app[DISK_GUARD],
        janitor=app[JANITOR],
        fleet=app.get(FLEET_FILLS),
    )
    app[ENTRY_BROWSER] = EntryBrowser(app[CACHE], app.get(INDEX))
    broadcast = get_state(app, BROADCAST)
    sampler = Sampler(app[STATS], app[CACHE], app.get(INDEX), app[JANITOR], broadcast)
    app[GROUP_VIEW] = group_view(settings, sampler, broadcast)
    app[ADMIN_API] = AdminApi(
        token=settings.admin.token,
        cache=app[CACHE],
        flights=app[FLIGHTS],
        index=app.get(INDEX),
        stats=app[STATS],
        guard=app[ADMIN_GUARD],
        ownership=ownership,
        janitor=app[JANITOR],
        disk_guard=app[DISK_GUARD],
        volume_totals=app[ENTRY_BROWSER].volume_totals,
        broadcast=broadcast,
        view=app[GROUP_VIEW],
    )
    modes = {c.identity for c in speak_contracts(settings)} - {settings.identity.mode, "none"}
    app[AUDIO_URL] = AudioUrl(
        identity=app[IDENTITY], cache=app[CACHE], ownership=ownership, modes=tuple(sorted(modes))
    )
    yield


async def operator_view(app: web.Application) -> AsyncIterator[None]:
    """History, metrics, readiness and the dashboard: what operators look at."""
    settings = get_state(app, SETTINGS)
    api = get_state(app, ADMIN_API)
    history = History(app[STATS], janitor=app.get(JANITOR))
    app[HISTORY] = history
    view = get_state(app, GROUP_VIEW)
    view.sampler.history = history
    app[METRICS] = Metrics(view, api.snapshot)
    session = readiness_session()
    app[READINESS] = Readiness(
        upstream_url=settings.upstream.url,
        session=session,
        volume=app.get(VOLUME),
        index=app.get(INDEX),
    )
    pages = AdminPages(settings.admin.token, app[IDENTITY], app[ADMIN_GUARD])
    browser = app[ENTRY_BROWSER]
    app[DASHBOARD] = Dashboard(pages, settings, api, history, browser)
    app[ENTRY_PAGES] = EntryPages(pages, api, browser)
    sampler = asyncio.create_task(history.run(), name="history")
    yield
    sampler.cancel()
    await asyncio.wait({sampler})
    await session.close()
