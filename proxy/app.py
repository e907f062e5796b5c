"""create_app(settings): the proxy as an aiohttp Application, with typed state and lifecycles."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Final, TypeVar

from aiohttp import web

from proxy import __version__
from proxy.admin.api import API_PREFIX, AdminApi
from proxy.admin.dashboard import Dashboard
from proxy.admin.entries import EntryBrowser
from proxy.admin.entry_pages import EntryPages
from proxy.admin.guard import AdminGuard
from proxy.admin.history import History
from proxy.admin.pages import AdminPages, setup_templates
from proxy.admin.routes import ADMIN_GUARD, DASHBOARD, ENTRY_PAGES, add_dashboard_routes
from proxy.config import IndexSettings, Settings
from proxy.fill import Flights
from proxy.fleet.broadcast import Broadcast
from proxy.fleet.fills import FleetFills
from proxy.fleet.group import SiblingServer, WorkerGroup
from proxy.fleet.setup import (
    after_volume_write,
    fleet_fills,
    group_view,
    serve_group,
    start_broadcast,
)
from proxy.fleet.view import GroupView, Sampler
from proxy.identity import IdentityResolver
from proxy.index.backfill import IndexBackfill
from proxy.index.coverage import VolumeCoverage
from proxy.index.entries import PostgresIndex
from proxy.index.legacy import LegacyMessages
from proxy.index.lookup import IndexLookup
from proxy.index.pool import index_enabled
from proxy.index.recorder import EntryRecorder
from proxy.index.rotating_password import RotatingPassword
from proxy.janitor import Janitor
from proxy.limits import ClientLimit, SlottedUpstream, UpstreamSlots
from proxy.metrics import Metrics
from proxy.ownership import OwnershipCheck
from proxy.policy import Admission
from proxy.readiness import Readiness, readiness_session
from proxy.request_context import Handler, with_request_id
from proxy.routes.audio import AUDIO_ROUTE, AudioUrl
from proxy.routes.passthrough import Passthrough, PassthroughLimits
from proxy.routes.responses import json_error
from proxy.routes.speak import SpeakHandler
from proxy.stats import CacheStats
from proxy.storage.disk import DiskGuard
from proxy.storage.memory import MemoryTier
from proxy.storage.tiered import WRITE_DELAY_SECONDS, TieredCache
from proxy.storage.tiers import DurableTier
from proxy.storage.volumes import backstop_seconds, build_volume
from proxy.upstreams.http import HttpUpstream, client_session
from proxy.upstreams.providers import ProviderChain, build_synthesizer, check_credentials

log = logging.getLogger(__name__)

SETTINGS: Final = web.AppKey("settings", Settings)
IDENTITY: Final = web.AppKey("identity", IdentityResolver)
STATS: Final = web.AppKey("stats", CacheStats)
FLIGHTS: Final = web.AppKey("flights", Flights)
UPSTREAM: Final = web.AppKey("upstream", HttpUpstream)
PASSTHROUGH: Final = web.AppKey("passthrough", Passthrough)
CACHE: Final = web.AppKey("cache", TieredCache)
INDEX: Final = web.AppKey("index", PostgresIndex)
LEGACY: Final = web.AppKey("legacy", LegacyMessages)
VOLUME: Final = web.AppKey("volume", DurableTier)
SPEAK_HANDLER: Final = web.AppKey("speak_handler", SpeakHandler)
AUDIO_URL: Final = web.AppKey("audio_url", AudioUrl)
ADMIN_API: Final = web.AppKey("admin_api", AdminApi)
ENTRY_BROWSER: Final = web.AppKey("entry_browser", EntryBrowser)
SYNTHESIZER: Final = web.AppKey("synthesizer", ProviderChain)
JANITOR: Final = web.AppKey("janitor", Janitor)
DISK_GUARD: Final = web.AppKey("disk_guard", DiskGuard)
HISTORY: Final = web.AppKey("history", History)
METRICS: Final = web.AppKey("metrics", Metrics)
READINESS: Final = web.AppKey("readiness", Readiness)
SLOTS: Final = web.AppKey("slots", UpstreamSlots)
CLIENT_LIMIT: Final = web.AppKey("client_limit", ClientLimit)
RECORDER: Final = web.AppKey("recorder", EntryRecorder)
INDEX_LOOKUP: Final = web.AppKey("index_lookup", IndexLookup)
BACKFILL: Final = web.AppKey("backfill", IndexBackfill)
GROUP: Final = web.AppKey("group", WorkerGroup)
BROADCAST: Final = web.AppKey("broadcast", Broadcast)
GROUP_VIEW: Final = web.AppKey("group_view", GroupView)
FLEET_FILLS: Final = web.AppKey("fleet_fills", FleetFills)

T = TypeVar("T")


def get_state(app: web.Application, key: web.AppKey[T]) -> T:
    """The app's state under `key`, or a clear error when its setup did not run."""
    try:
        return app[key]
    except KeyError:
        raise RuntimeError(f"{key!r} is not set up: was the app built by create_app?") from None


def runner_shutdown_timeout(drain_seconds: float) -> float:
    """aiohttp's shutdown_timeout for a drain of `drain_seconds` in all.

    At shutdown aiohttp waits for a request in flight twice, each time up to shutdown_timeout
    (for it to end, then for its task), before it cancels the request: a stream that never ends
    holds the stop for twice the timeout. Half each keeps the whole drain within its bound.
    """
    return drain_seconds / 2


def create_app(settings: Settings, *, group: WorkerGroup | None = None) -> web.Application:
    """The proxy application for `settings`; `group` when it is one worker of `serve --workers`."""
    check_credentials(settings.upstream)
    app = web.Application(client_max_size=max(settings.tts.max_body_bytes, 1024**2))
    app[SETTINGS] = settings
    if group is not None:
        app[GROUP] = group
    app[IDENTITY] = IdentityResolver(settings.identity)
    app[ADMIN_GUARD] = AdminGuard(settings.admin, app[IDENTITY])
    app[STATS] = CacheStats()
    app[FLIGHTS] = Flights()
    limit = app[CLIENT_LIMIT] = ClientLimit(
        settings.server.max_requests_per_client, app[IDENTITY], app[STATS]
    )
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_postgres_index)
    app.cleanup_ctx.append(_cache_tiers)
    app.cleanup_ctx.append(_fleet)
    app.cleanup_ctx.append(_housekeeping)
    app.cleanup_ctx.append(_handlers)
    app.cleanup_ctx.append(_operator_view)
    if group is not None:
        # Last: a sibling finds this worker only once everything it may ask for is ready.
        app.cleanup_ctx.append(_sibling_server)
    if settings.admin.token:  # no token, no pages (every one is a 404)
        setup_templates(app)

    # Every handler names the request id on its responses (with_request_id): no middleware or
    # on_response_prepare signal on the hot path.
    def add(method: str, path: str, handler: Handler) -> None:
        wrapped = with_request_id(handler)
        if method == "GET":  # and HEAD, as add_get does
            app.router.add_get(path, wrapped)
        else:
            app.router.add_route(method, path, wrapped)

    add("GET", "/_proxy/health", health)
    add("GET", "/_proxy/ready", ready)
    add("GET", "/_proxy/metrics", metrics)
    add("GET", AUDIO_ROUTE, audio)
    add("DELETE", f"{API_PREFIX}/entries", admin_purge)
    add("GET", f"{API_PREFIX}/stats", admin_stats)
    add_dashboard_routes(app)
    speak = app[SPEAK_ROUTE] = SpeakRoute()
    for path in settings.tts.speak_paths:
        add("POST", path, limit.guard(speak.handle))
    # The proxy's own space never reaches the backend: what it does not serve is its own 404.
    add("*", "/_proxy/{tail:.*}", proxy_not_found)
    add("*", "/{tail:.*}", limit.guard(forward))
    return app


async def health(request: web.Request) -> web.Response:
    """200 while the process serves; never touches the upstream."""
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.StreamResponse:
    """200 when the upstream, the Volume and the index answer; 503 naming those that do not."""
    return await request.app[READINESS].handle(request)


async def metrics(request: web.Request) -> web.StreamResponse:
    """Prometheus text; open, as most exporters are (it carries no user data)."""
    return await request.app[METRICS].handle(request)


class SpeakRoute:
    """The speak paths' handler: the speak handler, which is built at start (see _handlers)."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: SpeakHandler | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A POST to a speak path: the speak handler decides."""
        target = self.target
        if target is None:
            raise RuntimeError("the speak handler is not set up: did the app start?")
        return await target.handle(request)


SPEAK_ROUTE: Final = web.AppKey("speak_route", SpeakRoute)


async def audio(request: web.Request) -> web.StreamResponse:
    """The audio URL of a cached entry."""
    return await request.app[AUDIO_URL].handle(request)


async def admin_purge(request: web.Request) -> web.StreamResponse:
    """DELETE /_proxy/admin/api/entries."""
    return await request.app[ADMIN_API].purge_entries(request)


async def admin_stats(request: web.Request) -> web.StreamResponse:
    """GET /_proxy/admin/api/stats."""
    return await request.app[ADMIN_API].read_stats(request)


async def proxy_not_found(request: web.Request) -> web.StreamResponse:
    """Any /_proxy/* path without a route: a 404 from the proxy, never forwarded."""
    return json_error(404, "no such proxy path")


async def forward(request: web.Request) -> web.StreamResponse:
    """Everything else goes to the legacy backend untouched."""
    app = request.app
    headers = app[IDENTITY].forwardable_headers(request)
    return await app[PASSTHROUGH].forward(request, headers)


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
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


async def _cache_tiers(app: web.Application) -> AsyncIterator[None]:
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


async def _postgres_index(app: web.Application) -> AsyncIterator[None]:
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


async def _fleet(app: web.Application) -> AsyncIterator[None]:
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


async def _sibling_server(app: web.Application) -> AsyncIterator[None]:
    """This worker's socket in the group's folder: invalidations in, its numbers out, the
    fills of its keys."""
    server = SiblingServer(get_state(app, GROUP))
    serve_group(server, get_state(app, BROADCAST), app[GROUP_VIEW], app.get(FLEET_FILLS))
    await server.start()
    yield
    await server.aclose()


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
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


async def _handlers(app: web.Application) -> AsyncIterator[None]:
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
    app[AUDIO_URL] = AudioUrl(identity=app[IDENTITY], cache=app[CACHE], ownership=ownership)
    yield


async def _operator_view(app: web.Application) -> AsyncIterator[None]:
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
