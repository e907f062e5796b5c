"""The dashboard's own pages: login, logout, overview, configuration, and its style sheet."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.admin.api import AdminApi
from proxy.admin.auth import token_matches
from proxy.admin.entries import EntryBrowser
from proxy.admin.guard import too_many_guesses
from proxy.admin.history import History
from proxy.admin.overview import overview
from proxy.admin.pages import ADMIN, SECURITY_HEADERS, AdminPages, see_other
from proxy.config import Settings, redacted


@dataclass
class Dashboard:
    """Login, logout, the overview and the configuration page."""

    pages: AdminPages
    settings: Settings
    api: AdminApi
    history: History
    browser: EntryBrowser
    _style: tuple[bytes, str] | None = None

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/login."""
        self.pages.require_on()
        if self.pages.session(request) is not None:
            raise web.HTTPSeeOther(f"{ADMIN}/", headers=SECURITY_HEADERS)
        return self.pages.render(request, "login.html", {"error": None, "page": "login"})

    async def log_in(self, request: web.Request) -> web.StreamResponse:
        """POST /_proxy/admin/login: the admin token in, a session cookie out."""
        self.pages.require_on()
        self.pages.same_origin(request)
        wait = self.pages.access.retry_after(request)
        if wait is not None:
            return too_many_guesses(wait)
        form = await request.post()
        given = form.get("token")
        if not isinstance(given, str) or not token_matches(given, self.settings.admin.token):
            self.pages.access.failed(request)
            await self.pages.wrong_login()
            context = {"error": "That is not the admin token.", "page": "login"}
            return self.pages.render(request, "login.html", context, status=401)
        response = see_other(f"{ADMIN}/")
        self.pages.log_in(request, response)
        return response

    async def log_out(self, request: web.Request) -> web.StreamResponse:
        """POST /_proxy/admin/logout (with the CSRF token)."""
        session = self.pages.guard(request)
        await self.pages.form(request, session)
        response = see_other(f"{ADMIN}/login")
        self.pages.log_out(response, session)
        return response

    async def overview(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/: what the cache saves, holds and fails at."""
        session = self.pages.guard(request)
        context = await overview(self.api, self.history)
        return self.pages.render(
            request, "overview.html", {**context, "page": "overview"}, session=session
        )

    async def config(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/config: the effective settings, secrets redacted."""
        session = self.pages.guard(request)
        sections = [(name, flatten(table)) for name, table in redacted(self.settings).items()]
        context = {"sections": sections, "version": __version__, "page": "config"}
        return self.pages.render(request, "config.html", context, session=session)

    async def style(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin/style.css."""
        self.pages.require_on()
        if self._style is None:
            import aiohttp_jinja2

            env = aiohttp_jinja2.get_env(request.app)
            body = env.get_template("_style.html").render().encode()
            self._style = (body, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
        body, etag = self._style
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="text/css", headers=headers)

    async def bare(self, request: web.Request) -> web.StreamResponse:
        """GET /_proxy/admin: to the overview."""
        self.pages.require_on()
        raise web.HTTPPermanentRedirect(f"{ADMIN}/")


def flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A nested settings table as (dotted key, shown value) rows."""
    rows: list[tuple[str, str]] = []
    for name, value in table.items():
        if isinstance(value, dict):
            rows.extend(flatten(value, f"{prefix}{name}."))
        elif isinstance(value, list):
            rows.append((f"{prefix}{name}", ", ".join(str(item) for item in value) or "[]"))
        elif isinstance(value, bool):
            rows.append((f"{prefix}{name}", "true" if value else "false"))
        else:
            rows.append((f"{prefix}{name}", "" if value is None else str(value)))
    return rows
