"""Bearer-token checks for the admin API: off without a token, constant-time comparison."""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web

from proxy.admin.guard import AdminGuard, too_many_guesses
from proxy.routes.responses import json_error


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(given: str | None, expected: str) -> bool:
    """Compare in constant time, so response timing does not leak the token."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def refuse(request: web.BaseRequest, expected: str, guard: AdminGuard) -> web.Response | None:
    """None when the request carries the admin token; else the answer to give.

    Off (no token) or outside the allow-list: 404. A client past its wrong guesses: 429.
    """
    if not expected or not guard.allowed(request):
        return json_error(404, "the admin API is off: set admin.token to turn it on")
    wait = guard.retry_after(request)
    if wait is not None:
        return too_many_guesses(wait)
    if not token_matches(bearer_token(request), expected):
        guard.failed(request)
        return json_error(
            401, "a valid admin token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    return None
