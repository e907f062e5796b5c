"""What every dashboard page shares: the session guard, CSRF checks, rendering and headers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import hdrs, web

from proxy.admin.format import FILTERS
from proxy.admin.guard import AdminGuard
from proxy.admin.session import COOKIE_NAME, AdminSession, SessionSigner
from proxy.identity import IdentityResolver

ADMIN: Final = "/_proxy/admin"
TEMPLATES: Final = Path(__file__).parent / "templates"
# Nothing is fetched from elsewhere; the only style sheet is ours, the chart is inline SVG.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
WRONG_LOGIN_DELAY_SECONDS: Final = 0.25


def see_other(location: str) -> web.Response:
    """A 303 to `location` (after a form), with the dashboard's headers."""
    return web.Response(status=303, headers={"Location": location, **SECURITY_HEADERS})


def setup_templates(app: web.Application) -> None:
    """aiohttp-jinja2 on the admin templates, autoescaped, with the dashboard's filters.

    Imported here: a proxy without admin.token serves no page, and need not hold jinja2 (~2 MiB).
    """
    import aiohttp_jinja2
    import jinja2

    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        filters=FILTERS,
        undefined=jinja2.StrictUndefined,
    )


class AdminPages:
    """Sessions and rendering for the dashboard; every page is 404 while admin.token is unset."""

    def __init__(self, token: str, identity: IdentityResolver, guard: AdminGuard) -> None:
        self.signer = SessionSigner(token) if token else None
        self.identity = identity
        self.access = guard

    def require_on(self) -> SessionSigner:
        """The signer; raises 404 while the dashboard is off (no admin.token)."""
        if self.signer is None:
            raise web.HTTPNotFound(text="404: Not Found")
        return self.signer

    def session(self, request: web.BaseRequest) -> AdminSession | None:
        """The operator's session, or None."""
        if self.signer is None:
            return None
        return self.signer.read(request.cookies.get(COOKIE_NAME))

    def guard(self, request: web.BaseRequest) -> AdminSession:
        """The session; raises 404 when the dashboard is off, else a redirect to the login page."""
        self.require_on()
        session = self.session(request)
        if session is None:
            raise web.HTTPSeeOther(f"{ADMIN}/login", headers=SECURITY_HEADERS)
        return session

    async def form(self, request: web.Request, session: AdminSession) -> Mapping[str, str]:
        """The posted form, after its origin and CSRF token are checked (403 otherwise)."""
        self.same_origin(request)
        form = await request.post()
        csrf = form.get("csrf")
        if not isinstance(csrf, str) or not self.require_on().csrf_valid(session, csrf):
            raise self.forbidden("This form has expired or did not come from the dashboard.")
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def same_origin(self, request: web.BaseRequest) -> None:
        """Refuse a POST whose Origin names another host (403); the CSRF token is checked too."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or origin == "null":
            return
        host = origin.split("://", 1)[-1]
        allowed = {request.host}
        forwarded = request.headers.get("X-Forwarded-Host")
        if forwarded and self.identity.trusted_peer(request):
            # Behind a gateway that rewrites Host, the browser's origin is the public host.
            allowed.add(forwarded.split(",")[0].strip())
        if host not in allowed:
            raise self.forbidden("Cross-site request refused.")

    def forbidden(self, reason: str) -> web.HTTPForbidden:
        """A plain 403 with the dashboard's headers."""
        return web.HTTPForbidden(text=f"403: {reason}", headers=SECURITY_HEADERS)

    def render(
        self,
        request: web.Request,
        template: str,
        context: dict[str, Any],
        *,
        session: AdminSession | None = None,
        status: int = 200,
    ) -> web.Response:
        """A page, with the CSRF token for its forms and the security headers."""
        context = {"admin": ADMIN, "csrf": session.csrf if session else "", **context}
        import aiohttp_jinja2

        response = aiohttp_jinja2.render_template(template, request, context, status=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def log_in(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Set a new session cookie: HttpOnly, SameSite=Strict, Secure behind HTTPS."""
        signer = self.require_on()
        value, _ = signer.issue()
        response.set_cookie(
            COOKIE_NAME,
            value,
            max_age=signer.lifetime_seconds,
            path=ADMIN,
            httponly=True,
            samesite="Strict",
            secure=self._https(request),
        )

    def log_out(self, response: web.StreamResponse, session: AdminSession) -> None:
        """End the session here and drop its cookie."""
        self.require_on().revoke(session)
        response.del_cookie(COOKIE_NAME, path=ADMIN)

    async def wrong_login(self) -> None:
        """Slow down guessing a little; never blocks the loop."""
        await asyncio.sleep(WRONG_LOGIN_DELAY_SECONDS)

    def _https(self, request: web.BaseRequest) -> bool:
        if request.secure:
            return True
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        return forwarded == "https" and self.identity.trusted_peer(request)
