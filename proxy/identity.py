"""Who is asking, and whether to believe it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Final, NamedTuple

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.admin.session import COOKIE_NAME as ADMIN_COOKIE
from proxy.api_keys import ApiKeyUsers
from proxy.config import IdentitySettings
from proxy.headers import X_FORWARDED_FOR, X_REAL_IP
from proxy.reasons import Reason
from proxy.speak import valid_id

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Connection values that name no header but the hop-by-hop ones (checked without parsing).
_PLAIN_CONNECTION: Final = frozenset(
    {None, "close", "keep-alive", "Keep-Alive", "upgrade", "Upgrade"}
)

log = logging.getLogger(__name__)
# How often one peer address is warned about for sending identity headers while untrusted.
UNTRUSTED_WARNING_SECONDS: Final = 600.0

# The on-behalf-of token of the request being served, for tiers that act as the user.
# Tasks started while serving a request (write-behind) inherit it; it is never stored or logged.
CURRENT_TOKEN: ContextVar[str | None] = ContextVar("tts_proxy_current_token", default=None)


class Identity(NamedTuple):
    """A user the proxy believes, and their on-behalf-of token when one came along."""

    user: str
    token: str | None = None

    def __repr__(self) -> str:
        return f"Identity(user={self.user!r}, token={'***' if self.token else None})"


class IdentityResolver:
    """Reads identity headers, but only from trusted peers; strips them from others."""

    def __init__(
        self, settings: IdentitySettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.mode: Final = settings.mode
        # istr: looked up on every speak call, and multidict matches these without lowering them.
        self.user_header: Final = istr(settings.user_header)
        self.token_header: Final = istr(settings.token_header) if settings.token_header else None
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies
        )
        # An untrusted peer may claim neither an identity nor anything else a gateway says about
        # the caller (identity.untrusted_drop: the Databricks Apps gateway's headers by default).
        headers = [settings.user_header, settings.token_header, *settings.untrusted_drop]
        self._untrusted_drop: Final = tuple(istr(h) for h in headers if h)
        # RFC 9110 7.6.1 lets Connection name headers for removal; headers the proxy or the
        # backend rely on to know the caller are never removed that way (the request is a 400).
        self._protected: Final = frozenset(
            h.lower() for h in (*self._untrusted_drop, X_FORWARDED_FOR, "forwarded")
        )
        # Peers are few (the proxies in front); parsing an address per request is not free.
        self._verdicts: dict[str, bool] = {}
        self._by_connection: dict[int, tuple[weakref.ref[asyncio.BaseTransport], bool]] = {}
        # Peer addresses warned about, with when each may be warned about again.
        self._warned: dict[str, float] = {}
        self._clock = clock
        # Identities without a token are the same few users over and over: made once each.
        self._tokenless: dict[str, Identity] = {}
        self._api_keys = ApiKeyUsers(settings.api_key_secret)

    def trusted_peer(self, request: web.BaseRequest) -> bool:
        """True when the TCP peer is inside `identity.trusted_proxies`."""
        transport = request.transport
        if transport is None:
            return False
        # Keep-alive connections carry many requests: judge each connection once.
        known = self._by_connection.get(id(transport))
        if known is not None and known[0]() is transport:
            return known[1]
        verdict = self._peer_verdict(transport)
        if len(self._by_connection) >= 4096:
            self._by_connection.clear()
        # A weak reference: a closed connection must not be kept alive, nor its id mistaken.
        self._by_connection[id(transport)] = (weakref.ref(transport), verdict)
        return verdict

    def named_client(self, request: web.BaseRequest, *, trusted: bool | None = None) -> str | None:
        """The caller a trusted gateway names in one `X-Real-Ip`; None from anyone else."""
        if not (self.trusted_peer(request) if trusted is None else trusted):
            return None
        named = request.headers.getall(X_REAL_IP, ())
        if len(named) == 1 and named[0].strip():
            return named[0].strip()
        return None

    def client(self, request: web.BaseRequest) -> str:
        """The client a per-client rule judges: the caller a trusted gateway names, else the
        TCP peer (behind a gateway every request shares its address)."""
        return self.named_client(request) or request.remote or ""

    def _peer_verdict(self, transport: asyncio.BaseTransport) -> bool:
        peer = transport.get_extra_info("peername")
        if not peer:
            return False
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = self._judge(host)
            if len(self._verdicts) >= 4096:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict

    def _judge(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self._networks)

    def resolve(self, request: web.BaseRequest, *, trusted: bool | None = None) -> Identity | None:
        """The requesting user, or None when there is none to believe."""
        found = self.identify(request, trusted=trusted)
        return None if isinstance(found, Reason) else found

    def identify(
        self, request: web.BaseRequest, *, trusted: bool | None = None, mode: str | None = None
    ) -> Identity | Reason:
        """The requesting user, or the reason none is believed (for `Cache-Status`).

        `mode` is a route's own identity mode, when it has one; else `identity.mode`. A user a
        gateway names must be a valid id: the "_" segments are the cache's own (speak.py).
        """
        mode = self.mode if mode is None else mode
        if mode == "api-key":
            user = self._api_keys.user_of(request.headers.getall(hdrs.AUTHORIZATION, ()))
            return user if isinstance(user, Reason) else Identity(user=user)
        if mode == "none":
            return Reason.IDENTITY_OFF
        if not (self.trusted_peer(request) if trusted is None else trusted):
            return Reason.UNTRUSTED_PEER
        headers = request.headers
        users = headers.getall(self.user_header, ())
        if not users:
            return Reason.NO_IDENTITY
        if len(users) != 1 or "," in users[0]:
            return Reason.AMBIGUOUS_IDENTITY  # a gateway that appends must not choose for us
        user = users[0].strip()
        if not user:
            return Reason.NO_IDENTITY
        if not valid_id(user):
            return Reason.INVALID_ID
        token: str | None = None
        if self.token_header is not None:
            tokens = headers.getall(self.token_header, ())
            if len(tokens) > 1 or (tokens and "," in tokens[0]):
                return Reason.AMBIGUOUS_IDENTITY
            token = tokens[0] if tokens else None
        if token:
            return Identity(user=user, token=token)
        known = self._tokenless.get(user)
        if known is None:
            if len(self._tokenless) >= 4096:
                self._tokenless.clear()
            known = self._tokenless[user] = Identity(user=user)
        return known

    def forwardable_headers(
        self, request: web.BaseRequest, *, trusted: bool | None = None
    ) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        """The request headers to pass upstream.

        Identity headers are dropped from untrusted peers, and from trusted ones when they are
        repeated or lists (no identity was believed); the admin session cookie never leaves.
        Raises ProtectedHeader when Connection names a header the caller's identity rests on.
        """
        headers = request.headers
        connection = headers.getall(hdrs.CONNECTION, ())
        if connection and (len(connection) > 1 or connection[0].lower() not in _PLAIN_CONNECTION):
            self._refuse_protected(headers)
        if self.trusted_peer(request) if trusted is None else trusted:
            drop = self._ambiguous_identity(headers)
        else:
            drop = [h for h in self._untrusted_drop if h in headers]
            if drop and (self.user_header in drop or self.token_header in drop):
                self._warn_untrusted(request)
        cookie = headers.get(hdrs.COOKIE)
        if cookie is not None and ADMIN_COOKIE in cookie:
            stripped = without(headers, drop)
            _drop_admin_cookie(stripped)
            return stripped
        return without(headers, drop) if drop else headers

    def _warn_untrusted(self, request: web.BaseRequest) -> None:
        """Say once per peer address and interval that its identity headers were dropped.

        A gateway left out of identity.trusted_proxies looks exactly like this: every user's
        identity dropped. Naming the address lets an operator trust it instead of guessing.
        """
        peer = request.remote or "-"
        now = self._clock()
        if now < self._warned.get(peer, 0.0):
            return
        if len(self._warned) >= 1024:
            self._warned.clear()
        self._warned[peer] = now + UNTRUSTED_WARNING_SECONDS
        log.warning(
            "identity headers from %s were dropped: it is not in identity.trusted_proxies"
            " (add its address range there if it is the gateway in front of the proxy)",
            peer,
        )

    def _ambiguous_identity(self, headers: CIMultiDictProxy[str]) -> list[istr]:
        """The identity headers of a trusted request when they are repeated or lists."""
        drop: list[istr] = []
        for name in (self.user_header, self.token_header):
            if name is None:
                continue
            values = headers.getall(name, ())
            if len(values) > 1 or (values and "," in values[0]):
                drop.append(name)
        if drop and self.token_header is not None and self.token_header not in drop:
            drop.append(self.token_header)  # a token without its believed user is no one's
        if drop and self.user_header not in drop:
            drop.append(self.user_header)
        return drop

    def _refuse_protected(self, headers: CIMultiDictProxy[str]) -> None:
        named = {
            token.strip().lower()
            for value in headers.getall(hdrs.CONNECTION, ())
            for token in value.split(",")
        }
        if named & self._protected:
            raise ProtectedHeader()


class ProtectedHeader(web.HTTPBadRequest):
    """Connection names a header the caller's identity rests on: answered 400, never forwarded."""

    def __init__(self) -> None:
        super().__init__(
            text='{"detail": "Connection may not name identity or forwarding headers"}',
            content_type="application/json",
        )


def _drop_admin_cookie(headers: CIMultiDict[str]) -> None:
    """Remove the dashboard's session cookie from every Cookie header (RFC 6265 5.4 syntax)."""
    kept = []
    for value in headers.getall(hdrs.COOKIE, ()):
        pairs = [p for p in value.split(";") if p.strip().partition("=")[0] != ADMIN_COOKIE]
        if any(p.strip() for p in pairs):
            kept.append(";".join(pairs).strip())
    headers.popall(hdrs.COOKIE, None)
    for value in kept:
        headers.add(hdrs.COOKIE, value)


def without(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], names: Iterable[str]
) -> CIMultiDict[str]:
    """A copy of `headers` with every header in `names` removed."""
    copy = CIMultiDict(headers)
    for name in names:
        copy.popall(name, None)
    return copy


def loopback_trust_warning(host: str, identity: IdentitySettings) -> str | None:
    """The start-up warning for listening beyond loopback while trusting loopback alone.

    Behind a container runtime or a load balancer every peer is outside loopback, so such a
    proxy believes no identity: every speak call is `disabled` and the backend loses its user.
    """
    # Modes that believe no gateway (none, api-key) have nothing to warn about.
    if identity.mode in ("none", "api-key") or not _listens_beyond_loopback(host):
        return None
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in identity.trusted_proxies]
    if any(not network.is_loopback for network in networks):
        return None
    return (
        f"listening on {host or '*'} but identity.trusted_proxies trusts only loopback: "
        "identity headers from any other peer are dropped (nothing is cached for them, and the "
        "backend does not see who they are); set identity.trusted_proxies to the address range "
        "of the proxy or gateway in front"
    )


def _listens_beyond_loopback(host: str) -> bool:
    if host in {"", "0.0.0.0", "::", "*"}:
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return True
