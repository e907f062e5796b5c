"""Who may try the admin token: an optional network allow-list, and a throttle on wrong guesses."""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web
from cachetools import TTLCache

from proxy.identity import IdentityResolver
from proxy.settings import AdminSettings

# Wrong tokens a client may send per window before it must wait for the window to pass.
MAX_FAILURES: Final = 10
FAILURE_WINDOW_SECONDS: Final = 60.0
# Clients remembered at once; past it the oldest are forgotten (bounded memory under a flood).
MAX_CLIENTS: Final = 10_000


class AdminGuard:
    """Says whether a request may reach the admin pages and API, and whether it may guess now.

    The client is the TCP peer, or the `X-Real-Ip` a trusted gateway names (behind a gateway
    every request shares its address, and one guesser must not lock everyone out).
    """

    def __init__(
        self,
        settings: AdminSettings,
        identity: IdentityResolver,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._networks = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.allowed_networks
        )
        self._identity = identity
        self._clock = clock
        # client -> (failures in the window, when the window ends)
        self._failures: TTLCache[str, tuple[int, float]] = TTLCache(
            maxsize=MAX_CLIENTS, ttl=FAILURE_WINDOW_SECONDS, timer=clock
        )

    def allowed(self, request: web.BaseRequest) -> bool:
        """False when an allow-list is set and the client is outside it (the admin is a 404)."""
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(self.client(request).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def retry_after(self, request: web.BaseRequest) -> int | None:
        """Seconds this client must wait before its next guess, or None when it may guess now."""
        known = self._failures.get(self.client(request))
        if known is None or known[0] < MAX_FAILURES:
            return None
        return max(1, math.ceil(known[1] - self._clock()))

    def failed(self, request: web.BaseRequest) -> None:
        """Count a wrong token from this client."""
        client = self.client(request)
        count, ends = self._failures.get(client, (0, self._clock() + FAILURE_WINDOW_SECONDS))
        self._failures[client] = (count + 1, ends)

    def client(self, request: web.BaseRequest) -> str:
        """The address the throttle and the allow-list judge."""
        return self._identity.client(request)


def too_many_guesses(retry_after: int) -> web.Response:
    """429 with Retry-After (RFC 6585 4), in the {"detail"} shape."""
    return web.json_response(
        {"detail": "too many wrong admin tokens; try again later"},
        status=429,
        headers={"Retry-After": str(retry_after)},
    )
