"""Who is asking, and whether to believe it."""

from __future__ import annotations

import asyncio
import ipaddress
import weakref
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Final, NamedTuple

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.config import IdentitySettings
from proxy.headers import X_FORWARDED_HOST, X_FORWARDED_PROTO

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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

    def __init__(self, settings: IdentitySettings) -> None:
        self.mode: Final = settings.mode
        # istr: looked up on every speak call, and multidict matches these without lowering them.
        self.user_header: Final = istr(settings.user_header)
        self.token_header: Final = istr(settings.token_header) if settings.token_header else None
        self._networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies
        )
        # An untrusted peer may claim neither an identity nor a scheme or host for the backend.
        headers = [
            settings.user_header,
            settings.token_header,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
        ]
        self._untrusted_drop: Final = tuple(h for h in headers if h)
        # Peers are few (the proxies in front); parsing an address per request is not free.
        self._verdicts: dict[str, bool] = {}
        self._by_connection: dict[int, tuple[weakref.ref[asyncio.BaseTransport], bool]] = {}
        # Identities without a token are the same few users over and over: made once each.
        self._tokenless: dict[str, Identity] = {}

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
        if self.mode == "none":
            return None
        if not (self.trusted_peer(request) if trusted is None else trusted):
            return None
        headers = request.headers
        user = headers.get(self.user_header, "").strip()
        if not user:
            return None
        token = headers.get(self.token_header) if self.token_header else None
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
        """The request headers to pass upstream: identity headers dropped from untrusted peers."""
        if self.trusted_peer(request) if trusted is None else trusted:
            return request.headers
        present = [h for h in self._untrusted_drop if h in request.headers]
        if not present:
            return request.headers
        return without(request.headers, present)


def without(headers: CIMultiDictProxy[str], names: Iterable[str]) -> CIMultiDict[str]:
    """A copy of `headers` with every header in `names` removed."""
    copy = CIMultiDict(headers)
    for name in names:
        copy.popall(name, None)
    return copy
