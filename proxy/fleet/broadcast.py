"""Broadcast: invalidations sent to every other process, and who confirmed them in time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from proxy.fleet.group import Siblings, SiblingServer, WorkerGroup
from proxy.fleet.local import LocalInvalidations
from proxy.fleet.messages import (
    PURGE,
    BadMessage,
    Invalidation,
    MessageIds,
    stored_batches,
)
from proxy.fleet.postgres import PostgresBus
from proxy.speak import CacheKey
from proxy.storage.scope import Scope

log = logging.getLogger(__name__)

INVALIDATE_PATH: Final = "/fleet/invalidate"
# Stored notices are batched by the sending task; a shutdown waits this long for the last batch.
CLOSE_WAIT_SECONDS: Final = 2.0


@dataclass(frozen=True)
class Confirmation:
    """How many processes confirmed a purge within the bound, of how many were expected.

    `expected` counts this process, the workers of its group and the processes listening on
    the index's PostgreSQL when the purge was sent; None when PostgreSQL could not say (then
    the other replicas may not have been told, and `note` says so).
    """

    confirmed: int
    expected: int | None
    seconds: float
    unconfirmed: tuple[str, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The purge answer's `processes`."""
        data: dict[str, Any] = {
            "confirmed": self.confirmed,
            "expected": self.expected,
            "seconds": round(self.seconds, 4),
        }
        if self.note:
            data["note"] = self.note
        return data


class Broadcast:
    """Tells the other processes what to drop: the workers of this group over their sockets,
    and every process on the index's PostgreSQL (other replicas too) over NOTIFY. A process
    reached both ways applies a message once (`LocalInvalidations`)."""

    def __init__(
        self,
        local: LocalInvalidations,
        *,
        process: str,
        confirm_timeout_seconds: float,
        group: WorkerGroup | None = None,
        siblings: Siblings | None = None,
        bus: PostgresBus | None = None,
        serving: bool = True,
    ) -> None:
        self.local = local
        self.process = process
        # A process that serves counts itself among those that dropped a purge; the purge
        # command, which holds nothing, does not.
        self.serving = serving
        self.group = group
        self.siblings = siblings
        self.bus = bus
        self.confirm_timeout = confirm_timeout_seconds
        self.ids = MessageIds(process)
        self.sent: Counter[str] = Counter()
        # Purges some expected process did not confirm within the bound.
        self.unconfirmed_purges = 0
        self._stored: list[tuple[CacheKey, str]] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def reaches_others(self) -> bool:
        """False for a lone process without an index: nothing to tell anyone."""
        return self.siblings is not None or self.bus is not None

    def serve_on(self, server: SiblingServer) -> None:
        """Take invalidations from the group's other workers."""
        server.add_route("POST", INVALIDATE_PATH, self._from_sibling)

    async def invalidate(self, scope: Scope) -> Confirmation:
        """Tell every other process to drop `scope` (this one already has); wait for their
        confirmations, at most `confirm_timeout_seconds`."""
        started = time.monotonic()
        if not self.reaches_others:
            return Confirmation(1, 1, 0.0)
        reply = self.bus.reply if self.bus is not None else ""
        message = Invalidation(self.ids.next(), self.process, PURGE, scope=scope, reply=reply)
        deadline = started + self.confirm_timeout
        myself = {self.process} if self.serving else set()
        confirmed = set(myself)
        expected: set[str] | None = set(myself)
        notes: list[str] = []
        changed = asyncio.Event()

        def acked(process: str) -> None:
            confirmed.add(process)
            changed.set()

        group_call = self._tell_group(message, deadline)
        if self.bus is not None:
            self.bus.expect_acks(message.id, acked)
        try:
            if self.bus is not None:
                (group_expected, group_confirmed), listeners, published = await asyncio.gather(
                    group_call, self.bus.listeners(), self.bus.publish(message)
                )
            else:
                group_expected, group_confirmed = await group_call
                listeners, published = set(), True
            confirmed |= group_confirmed
            if listeners is None or not published:
                notes.append("PostgreSQL did not answer: other replicas may still hold it")
                expected = None
            else:
                expected = myself | group_expected | listeners
                await _until(lambda: expected <= confirmed, changed, deadline)
        finally:
            if self.bus is not None:
                self.bus.forget_acks(message.id)
        self.sent[PURGE] += 1
        return self._confirmation(confirmed, expected, started, notes)

    def stored(self, key: CacheKey, body_sha256: str) -> None:
        """Tell the others that `key` has a new recording: they drop another copy they hold.
        Sent in batches by one task, off the caller's path."""
        self.local.note_stored(key, own=True)
        if not self.reaches_others or self._closed:
            return
        self._stored.append((key, body_sha256))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_stored())

    async def aclose(self) -> None:
        """Send what is queued (bounded), then close the sockets' sessions and the channel."""
        self._closed = True
        sender = self._sender
        if sender is not None and not sender.done():
            await asyncio.wait({sender}, timeout=CLOSE_WAIT_SECONDS)
        if self.siblings is not None:
            await self.siblings.aclose()
        if self.bus is not None:
            await self.bus.aclose()

    async def _send_stored(self) -> None:
        while self._stored:
            batch, self._stored = self._stored, []
            for message in stored_batches(self.ids, batch):
                self.sent[message.kind] += 1
                sends: list[Awaitable[Any]] = [self._tell_group(message, self._deadline())]
                if self.bus is not None:
                    sends.append(self.bus.publish(message))
                try:
                    await asyncio.gather(*sends)
                except Exception as exc:
                    log.warning("stored notice not sent: %s", type(exc).__name__)

    async def _tell_group(
        self, message: Invalidation, deadline: float
    ) -> tuple[set[str], set[str]]:
        """Post `message` to every sibling: (the workers expected, those that confirmed)."""
        siblings, group = self.siblings, self.group
        if siblings is None or group is None:
            return set(), set()
        timeout = max(deadline - time.monotonic(), 0.0)
        answers = await siblings.call_all(
            "POST", INVALIDATE_PATH, within=timeout, json=message.to_json()
        )
        expected = {group.name_of(answer.pid) for answer in answers}
        # Workers without a socket yet (starting) are expected all the same.
        expected |= {f"{group.token}-worker-{n}" for n in range(group.size - 1 - len(answers))}
        confirmed = {
            str(answer.data.get("process"))
            for answer in answers
            if answer.ok and isinstance(answer.data, dict)
        }
        for answer in answers:
            if not answer.ok:
                log.warning(
                    "worker %d did not confirm an invalidation: %s", answer.pid, answer.error
                )
        return expected, confirmed

    def _deadline(self) -> float:
        return time.monotonic() + self.confirm_timeout

    def _confirmation(
        self, confirmed: set[str], expected: set[str] | None, started: float, notes: list[str]
    ) -> Confirmation:
        seconds = time.monotonic() - started
        if expected is None:
            self.unconfirmed_purges += 1
            return Confirmation(len(confirmed), None, seconds, note="; ".join(notes))
        expected |= confirmed  # a process that started listening after the presence was read
        missing = tuple(sorted(expected - confirmed))
        if missing:
            self.unconfirmed_purges += 1
            notes.append(
                f"{len(missing)} process(es) did not confirm within {self.confirm_timeout:g} s"
            )
            log.warning("purge not confirmed by %s", ", ".join(missing))
        return Confirmation(len(confirmed), len(expected), seconds, missing, "; ".join(notes))

    async def _from_sibling(self, request: web.Request) -> web.StreamResponse:
        """POST /fleet/invalidate from another worker: apply, then confirm."""
        try:
            message = Invalidation.from_json(await request.json())
        except (BadMessage, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if message.origin != self.process:
            await self.local.apply(message)
        return web.json_response({"process": self.process})


async def _until(done: Callable[[], bool], changed: asyncio.Event, deadline: float) -> None:
    """Wait until `done()` (checked each time `changed` is set), or until `deadline`."""
    while not done():
        changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            await asyncio.wait_for(changed.wait(), left)
        except TimeoutError:
            return
