"""The proof for issue 15's item 5: while an attacker holds all it may (slow bodies from one
address, event streams from several), a normal user's ordinary GET and speak call are served."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tests.conftest import StartProxy
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.security.attacker import Siege, backend_saw, time_normal_user

# Small pools, so the attack is a few dozen connections: 16 ordinary slots, 8 for streams.
LIMITS: dict[str, Any] = {
    "upstream.max_connections": 24,
    "upstream.max_streams": 8,
    "server.max_requests_per_client": 8,
    "upstream.slot_wait_seconds": 1.0,
}
MALLORY = "203.0.113.66"
STREAMERS = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"]
# Generous: served at once, a normal request takes milliseconds on loopback.
SERVED_WITHIN = 1.0


async def test_a_normal_user_is_served_while_an_attacker_holds_the_maximum(
    start_proxy: StartProxy, legacy_backend: FakeLegacyBackend
) -> None:
    proxy = await start_proxy({"upstream.url": legacy_backend.url, **LIMITS})
    async with Siege(proxy.port) as siege:
        # More slow bodies than there are connections upstream, all from one address.
        await siege.slow_bodies(30, address=MALLORY)
        await backend_saw(legacy_backend, "/upload", 8)
        # Three times the streams' pool, from four addresses.
        await siege.event_streams(6, STREAMERS)

        timings = await time_normal_user(proxy.port, 5, address="198.51.100.7", tag="carol")

        worst = timings.worst()
        assert worst is not None, timings  # every request answered 200
        assert worst < SERVED_WITHIN, timings
        # What the attacker held: its share of the ordinary slots, and the streams' pool.
        assert siege.body_statuses() == Counter({"held": 8, 429: 22})
        assert siege.stream_statuses == Counter({200: 8, 503: 16})
        assert legacy_backend.calls["/upload"] == 8
