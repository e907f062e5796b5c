"""PostgresBus: invalidations across replicas over LISTEN/NOTIFY, on a session of its own.

LISTEN needs a session that stays open (a transaction-mode pooler would hand the LISTEN to
another client), so the bus holds a connection outside the pool (`IndexPool`'s own connection,
as the janitor's lock does) and reconnects with backoff when it is lost. Notifications sent while
it was away are gone, so every reconnection is a gap the owner is told of (`on_gap`: drop the
whole memory tier). NOTIFY and the presence query go over the same session while it is up (one
operation at a time), else through the pool: a pooled connection may have to be opened first.

Every replica and worker of one deployment (one `index.schema`) listens on one channel; each
also listens on a reply channel of its own, where the processes it told acknowledge. Which
processes listen now is read from `pg_stat_activity` (each listening session names itself in
`application_name`), so no table is needed to know whom to expect.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from proxy.fleet.messages import BadMessage, Invalidation
from proxy.index.pool import IndexPool, IndexUnavailable, Query

log = logging.getLogger(__name__)

APPLICATION_PREFIX: Final = "tts-fleet"
HEARTBEAT_SECONDS: Final = 5.0
RETRY_INITIAL_SECONDS: Final = 0.1
RETRY_MAX_SECONDS: Final = 5.0

OnMessage = Callable[[Invalidation], Awaitable[None]]
OnGap = Callable[[], Awaitable[Any]]
OnAck = Callable[[str], None]
T = TypeVar("T")


def channel_tag(schema: str) -> str:
    """The deployment's tag: every process on the same index schema shares the channel."""
    return hashlib.sha256(schema.encode()).hexdigest()[:12]


class PostgresBus:
    """Sends invalidations with NOTIFY, receives them on a LISTEN session, collects acks."""

    def __init__(
        self,
        pool: IndexPool,
        *,
        process: str,
        on_message: OnMessage | None = None,
        on_gap: OnGap | None = None,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        retry_initial_seconds: float = RETRY_INITIAL_SECONDS,
        retry_max_seconds: float = RETRY_MAX_SECONDS,
    ) -> None:
        self.pool = pool
        self.process = process
        tag = channel_tag(pool.schema)
        self.channel = f"tts_fleet_{tag}"
        self.reply = f"tts_fleet_{tag}_{process.replace('-', '_')}"[:63]
        # A process that only sends (the purge command) is not one to expect acks from.
        self.listens = on_message is not None
        self.application_name = f"{APPLICATION_PREFIX}{'' if self.listens else '-cli'} {tag} "
        self.application_name = (self.application_name + process)[:63]
        self._on_message = on_message
        self._on_gap = on_gap
        self._heartbeat = heartbeat_seconds
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self.connected = False
        self.connections = 0
        self.errors: Counter[str] = Counter()
        self._acks: dict[str, OnAck] = {}
        self._work: set[asyncio.Task[None]] = set()
        self._connected_once = asyncio.Event()
        self._missed_start = False
        self._task: asyncio.Task[None] | None = None
        # The LISTEN session while it is up; one operation at a time on it.
        self._session: Any = None
        self._session_lock = asyncio.Lock()

    async def start(self, wait_seconds: float) -> bool:
        """Connect in the background; wait up to `wait_seconds` for the first LISTEN. A process
        that serves before its first LISTEN drops its memory when it comes (it may have missed
        invalidations meanwhile)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-listen")
        try:
            await asyncio.wait_for(asyncio.shield(self._connected_once.wait()), wait_seconds)
        except TimeoutError:
            self._missed_start = True
            log.warning("invalidation channel not connected at start; retrying in the background")
            return False
        return True

    async def aclose(self) -> None:
        """Stop listening; work already started (an ack) finishes."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._work:
            await asyncio.wait(self._work, timeout=2.0)

    def expect_acks(self, message_id: str, on_ack: OnAck) -> None:
        """Call `on_ack(process)` for each acknowledgement of `message_id` (until forgotten)."""
        self._acks[message_id] = on_ack

    def forget_acks(self, message_id: str) -> None:
        """Stop collecting acknowledgements of `message_id`."""
        self._acks.pop(message_id, None)

    async def publish(self, message: Invalidation) -> bool:
        """NOTIFY every listening process; False when PostgreSQL did not take it."""
        return await self._notify(self.channel, message.payload())

    async def listeners(self) -> set[str] | None:
        """The processes listening on the channel now (from pg_stat_activity); None when
        PostgreSQL cannot say."""
        pattern = f"{APPLICATION_PREFIX} {channel_tag(self.pool.schema)} %"

        async def query(con: Any) -> list[Any]:
            rows: list[Any] = await con.fetch(
                "SELECT application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE $1",
                pattern,
            )
            return rows

        try:
            rows = await self._on_session("presence", query)
        except IndexUnavailable:
            return None
        return {str(row[0]).rsplit(" ", 1)[-1] for row in rows}

    async def _notify(self, channel: str, payload: str) -> bool:
        async def send(con: Any) -> None:
            await con.execute("SELECT pg_notify($1, $2)", channel, payload)

        try:
            await self._on_session("notify", send)
        except IndexUnavailable:
            self.errors["notify"] += 1
            return False
        return True

    async def _on_session(self, op: str, query: Query[T]) -> T:
        """`query` on the LISTEN session while it is up (bounded), else through the pool."""
        session = self._session
        if session is not None:
            try:
                async with self._session_lock:
                    return await asyncio.wait_for(query(session), self._heartbeat)
            except Exception as exc:
                self.errors[op] += 1
                log.debug("%s on the invalidation session failed: %s", op, type(exc).__name__)
        return await self.pool.run(op, query)

    async def _run(self) -> None:
        delay = self._retry_initial
        while True:
            try:
                async with self.pool.session_connection() as con:
                    await self._listen(con)
                    delay = self._retry_initial
                    await self._watch(con)
            except asyncio.CancelledError:
                raise
            except IndexUnavailable:
                pass  # the pool logged it; retried below
            except Exception as exc:
                self.errors["listen"] += 1
                log.debug("invalidation channel failed: %s", type(exc).__name__)
            if self.connected:
                log.warning("invalidation channel lost; reconnecting")
            self.connected = False
            self._session = None
            # Jitter keeps processes that lost the server together from retrying in lockstep.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._retry_max)

    async def _listen(self, con: Any) -> None:
        await con.execute("SELECT set_config('application_name', $1, false)", self.application_name)
        if self._on_message is not None:
            await con.add_listener(self.channel, self._notified)
        await con.add_listener(self.reply, self._acked)
        self._session = con
        self.connected = True
        self.connections += 1
        missed = self.connections > 1 or self._missed_start
        if missed:
            log.info("invalidation channel connected again")
        self._connected_once.set()
        if missed and self._on_gap is not None:
            # After LISTEN: what is sent from now on arrives; what was sent before is covered.
            await self._on_gap()

    async def _watch(self, con: Any) -> None:
        """Return when the session is lost: closed by the server, or silent to a heartbeat."""
        lost = asyncio.Event()
        con.add_termination_listener(lambda _con: lost.set())
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), self._heartbeat)
                return
            except TimeoutError:
                pass
            try:
                async with self._session_lock:
                    await asyncio.wait_for(con.fetchval("SELECT 1"), self._heartbeat)
            except Exception:
                return

    def _notified(self, _con: Any, _pid: int, _channel: str, payload: str) -> None:
        self._spawn(self._receive(payload))

    def _acked(self, _con: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            message_id, process = str(data["id"]), str(data["process"])
        except (ValueError, KeyError, TypeError):
            self.errors["bad_ack"] += 1
            return
        on_ack = self._acks.get(message_id)
        if on_ack is not None:
            on_ack(process)

    async def _receive(self, payload: str) -> None:
        try:
            message = Invalidation.from_payload(payload)
        except BadMessage as exc:
            self.errors["bad_message"] += 1
            log.warning("invalidation ignored: %s", exc)
            return
        if message.origin == self.process or self._on_message is None:
            return  # its origin applied it before sending
        await self._on_message(message)
        if message.reply:
            ack = json.dumps({"id": message.id, "process": self.process})
            if not await self._notify(message.reply, ack):
                self.errors["ack"] += 1

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                self.errors["apply"] += 1
                log.warning("invalidation failed: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(guarded())
        self._work.add(task)
        task.add_done_callback(self._work.discard)
