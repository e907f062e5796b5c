"""Dashboard sessions: a signed, expiring cookie and a CSRF token bound to it.

The signing key is derived from admin.token, so every worker and replica accepts a session any
of them issued, and changing the token ends every session. The cookie holds an expiry, a random
nonce and an HMAC: never the token, and nothing the token can be recovered from.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

COOKIE_NAME: Final = "tts_proxy_admin"
SESSION_SECONDS: Final = 8 * 3600
_MAX_REVOKED: Final = 10_000


@dataclass(frozen=True, slots=True)
class AdminSession:
    """A logged-in operator: the session's nonce, its expiry and its CSRF token."""

    nonce: str
    expires: int
    csrf: str


class SessionSigner:
    """Issues and checks session cookies and CSRF tokens."""

    def __init__(
        self,
        token: str,
        *,
        lifetime_seconds: int = SESSION_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not token:
            raise ValueError("sessions need admin.token")
        self._key = hmac.new(token.encode(), b"tts-cache-proxy admin session v1", "sha256").digest()
        self.lifetime_seconds = lifetime_seconds
        self._clock = clock
        # Logged-out sessions, until they expire (this process only; see docs/architecture.md).
        self._revoked: dict[str, int] = {}

    def issue(self) -> tuple[str, AdminSession]:
        """A new session and its cookie value."""
        expires = int(self._clock()) + self.lifetime_seconds
        nonce = secrets.token_urlsafe(18)
        payload = f"{expires}.{nonce}"
        return f"{payload}.{self._sign('session', payload)}", self._session(nonce, expires)

    def read(self, cookie: str | None) -> AdminSession | None:
        """The session a cookie value stands for, or None when it is forged, expired or revoked."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires_text, nonce, signature = cookie.split(".")
        payload = f"{expires_text}.{nonce}"
        expected = self._sign("session", payload)
        if not signature.isascii() or not hmac.compare_digest(signature, expected):
            return None
        if not expires_text.isdigit() or int(expires_text) <= self._clock():
            return None
        if nonce in self._revoked:
            return None
        return self._session(nonce, int(expires_text))

    def revoke(self, session: AdminSession) -> None:
        """Refuse this session from now on (logout)."""
        now = self._clock()
        if len(self._revoked) >= _MAX_REVOKED:
            self._revoked = {n: e for n, e in self._revoked.items() if e > now}
        self._revoked[session.nonce] = session.expires

    def csrf_valid(self, session: AdminSession, given: str | None) -> bool:
        """True when a form carried this session's CSRF token."""
        return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())

    def _session(self, nonce: str, expires: int) -> AdminSession:
        return AdminSession(nonce, expires, self._sign("csrf", nonce)[:32])

    def _sign(self, purpose: str, payload: str) -> str:
        return hmac.new(self._key, f"{purpose}:{payload}".encode(), hashlib.sha256).hexdigest()
