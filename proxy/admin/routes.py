"""The dashboard's routes, installed before the pass-through catch-all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from aiohttp import web

from proxy.admin.dashboard import Dashboard
from proxy.admin.entry_pages import ADMIN_AUDIO_ROUTE, EntryPages
from proxy.admin.guard import AdminGuard
from proxy.admin.pages import ADMIN
from proxy.request_context import Handler, with_request_id

T = TypeVar("T")
Method = Callable[[T, web.Request], Awaitable[web.StreamResponse]]

ADMIN_GUARD: Final = web.AppKey("admin_guard", AdminGuard)
DASHBOARD: Final = web.AppKey("dashboard", Dashboard)
ENTRY_PAGES: Final = web.AppKey("entry_pages", EntryPages)


def _bound(key: web.AppKey[T], method: Method[T]) -> Handler:
    """A handler that calls `method` on the app's state under `key` (set up at start).

    Its responses name the request id, as every route's do (with_request_id).
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        if not request.app[ADMIN_GUARD].allowed(request):
            raise web.HTTPNotFound(text="404: Not Found")  # outside admin.allowed_networks
        return await method(request.app[key], request)

    handler.__doc__ = method.__doc__
    return with_request_id(handler)


def add_dashboard_routes(app: web.Application) -> None:
    """GET pages, POST forms and the admin audio URL under /_proxy/admin/."""
    router = app.router
    router.add_get(ADMIN, _bound(DASHBOARD, Dashboard.bare))
    router.add_get(f"{ADMIN}/", _bound(DASHBOARD, Dashboard.overview))
    router.add_get(f"{ADMIN}/login", _bound(DASHBOARD, Dashboard.login_form))
    router.add_post(f"{ADMIN}/login", _bound(DASHBOARD, Dashboard.log_in))
    router.add_post(f"{ADMIN}/logout", _bound(DASHBOARD, Dashboard.log_out))
    router.add_get(f"{ADMIN}/config", _bound(DASHBOARD, Dashboard.config))
    router.add_get(f"{ADMIN}/style.css", _bound(DASHBOARD, Dashboard.style))
    router.add_get(f"{ADMIN}/entries", _bound(ENTRY_PAGES, EntryPages.entries))
    router.add_get(f"{ADMIN}/entry", _bound(ENTRY_PAGES, EntryPages.entry))
    router.add_get(f"{ADMIN}/purge", _bound(ENTRY_PAGES, EntryPages.confirm_purge))
    router.add_post(f"{ADMIN}/purge", _bound(ENTRY_PAGES, EntryPages.purge))
    router.add_get(ADMIN_AUDIO_ROUTE, _bound(ENTRY_PAGES, EntryPages.audio))
