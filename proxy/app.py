"""create_app(settings): the proxy as an aiohttp Application: its state, parts and routes."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy import __version__, lifecycles
from proxy.admin.api import API_PREFIX
from proxy.admin.guard import AdminGuard
from proxy.admin.pages import setup_templates
from proxy.admin.routes import ADMIN_GUARD, add_dashboard_routes
from proxy.config import Settings
from proxy.contracts import speak_contracts
from proxy.fill import Flights
from proxy.fleet.group import WorkerGroup
from proxy.identity import IdentityResolver
from proxy.limits import ClientLimit
from proxy.request_context import Handler, with_request_id
from proxy.routes.audio import AUDIO_ROUTE
from proxy.routes.responses import json_error
from proxy.state import (
    ADMIN_API,
    AUDIO_URL,
    CLIENT_LIMIT,
    FLIGHTS,
    GROUP,
    IDENTITY,
    METRICS,
    PASSTHROUGH,
    READINESS,
    SETTINGS,
    SPEAK_ROUTE,
    STATS,
    SpeakRoute,
)
from proxy.stats import CacheStats
from proxy.upstreams.provider_setup import check_credentials

log = logging.getLogger(__name__)


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
    app.cleanup_ctx.append(lifecycles.upstream_session)
    app.cleanup_ctx.append(lifecycles.postgres_index)
    app.cleanup_ctx.append(lifecycles.cache_tiers)
    app.cleanup_ctx.append(lifecycles.fleet)
    app.cleanup_ctx.append(lifecycles.housekeeping)
    app.cleanup_ctx.append(lifecycles.handlers)
    app.cleanup_ctx.append(lifecycles.operator_view)
    if group is not None:
        # Last: a sibling finds this worker only once everything it may ask for is ready.
        app.cleanup_ctx.append(lifecycles.sibling_server)
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
