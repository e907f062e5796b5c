"""create_app(settings): the proxy as an aiohttp Application, with typed state and lifecycles."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
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
from proxy.contracts import Contract, speak_contracts
from proxy.draining import Drain
from proxy.fill import Flights
from proxy.identity import IdentityResolver
from proxy.index.entries import PostgresIndex
from proxy.index.legacy import LegacyMessages
from proxy.index.pool import index_enabled
from proxy.index.rotating_password import RotatingPassword
from proxy.janitor import Janitor
from proxy.limits import ClientLimit, SlottedUpstream, UpstreamSlots
from proxy.metrics import Metrics, ProxyCollector
from proxy.ownership import OwnershipCheck
from proxy.policy import Admission
from proxy.readiness import Readiness, readiness_session
from proxy.request_context import Handler, with_request_id
from proxy.routes.audio import AUDIO_ROUTE, AudioUrl
from proxy.routes.passthrough import Passthrough, PassthroughLimits
from proxy.routes.responses import json_error
from proxy.routes.speak import SpeakHandler
from proxy.speak import CacheKey
from proxy.stats import CacheStats
from proxy.storage.disk import DiskGuard
from proxy.storage.entry import Entry
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

T = TypeVar("T")


def get_state(app: web.Application, key: web.AppKey[T]) -> T:
    """The app's state under `key`, or a clear error when its setup did not run."""
    try:
        return app[key]
    except KeyError:
        raise RuntimeError(f"{key!r} is not set up: was the app built by create_app?") from None


def create_app(settings: Settings) -> web.Application:
    """The proxy application for `settings`."""
    check_credentials(settings.upstream)
    app = web.Application(client_max_size=max(settings.tts.max_body_bytes, 1024**2))
    app[SETTINGS] = settings
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
    app.cleanup_ctx.append(_housekeeping)
    app.cleanup_ctx.append(_handlers)
    app.cleanup_ctx.append(_operator_view)
    if settings.admin.token:  # no token, no pages (every one is a 404)
        setup_templates(app)

    drain = Drain(settings.server.shutdown_timeout_seconds)
    app.on_shutdown.append(drain.on_shutdown)
    app.on_cleanup.append(drain.on_cleanup)

    # Every handler names the request id on its responses (with_request_id), and is cut when the
    # stop's bound passes (Drain): no middleware or on_response_prepare signal on the hot path.
    def add(method: str, path: str, handler: Handler) -> None:
        wrapped = with_request_id(drain.guard(handler))
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
    for contract in speak_contracts(settings):
        add("POST", contract.path, limit.guard(speak.handler_for(contract)))
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
    """The speak routes' handler: the speak handler, which is built at start (see _handlers)."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: SpeakHandler | None = None

    def handler_for(self, contract: Contract) -> Handler:
        """The handler of one speak route: the speak handler, told the route's contract."""

        async def handle(request: web.Request) -> web.StreamResponse:
            target = self.target
            if target is None:
                raise RuntimeError("the speak handler is not set up: did the app start?")
            return await target.handle(request, contract)

        return handle


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
    recorder = _recorder(settings, volume, index, app[LEGACY]) if index and volume else None
    app[CACHE] = TieredCache(
        memory,
        volume,
        timeout_seconds=backstop_seconds(cache_settings.volume),
        logger=log,
        after_volume_write=recorder,
        write_delay_seconds=WRITE_DELAY_SECONDS,
    )
    yield
    if cleanup is not None and not cleanup.done():
        cleanup.cancel()
    await get_state(app, FLIGHTS).aclose()
    await app[CACHE].aclose()


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
    settings: Settings, volume: DurableTier, index: PostgresIndex, legacy: LegacyMessages
) -> Callable[[CacheKey, Entry], Awaitable[None]]:
    """After a Volume write: the index row, and the legacy metadata where configured."""

    async def record(key: CacheKey, entry: Entry) -> None:
        path = volume.location(key, entry.meta.content_type)
        await index.record(key, entry.meta, path)
        # chat_messages has a row per message: a content key (a text's recording) has none.
        if settings.index.write_legacy_metadata and not key.is_content:
            await legacy.write_metadata(key, path, entry.meta.provider, entry.meta.created_at)

    return record


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    settings = get_state(app, SETTINGS)
    guard = DiskGuard.from_settings(settings.cache.volume)
    await guard.refresh()  # a real answer before the first request
    app[DISK_GUARD] = guard
    janitor = Janitor(settings.cache, get_state(app, CACHE), app.get(VOLUME), app.get(INDEX))
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
        direct=SlottedUpstream(upstream, app[SLOTS]),
        stats=app[STATS],
        index=app.get(INDEX),
        ownership=ownership,
        admission=Admission(min_uses=settings.cache.min_uses),
        disk_guard=app[DISK_GUARD],
        janitor=app[JANITOR],
    )
    app[ENTRY_BROWSER] = EntryBrowser(app[CACHE], app.get(INDEX))
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
    )
    modes = {c.identity for c in speak_contracts(settings)} - {settings.identity.mode, "none"}
    app[AUDIO_URL] = AudioUrl(
        identity=app[IDENTITY], cache=app[CACHE], ownership=ownership, modes=tuple(sorted(modes))
    )
    yield


async def _operator_view(app: web.Application) -> AsyncIterator[None]:
    """History, metrics, readiness and the dashboard: what operators look at."""
    settings = get_state(app, SETTINGS)
    api = get_state(app, ADMIN_API)
    history = History(app[STATS], janitor=app.get(JANITOR))
    app[HISTORY] = history
    collector = ProxyCollector(app[STATS], api.cache, index=api.index, janitor=api.janitor)
    app[METRICS] = Metrics(collector, api.snapshot)
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
