"""`python -m bench.fleet_replay`: the fleet at scale, as a trace-driven replay simulation.

Real processes cannot be run by the thousand on one machine, so this replays a synthetic chat
workload (bench/chat_trace.py: users who get assistant messages, play most of them, replay older
ones, double-tap some) through a model of the fleet (`Fleet`: replicas of workers, each with a
byte-bounded LRU memory tier, one shared Volume, connections routed to a random replica and
worker and kept for a while, fills shared as the proxy shares them) and counts what each part
of the fleet would see: memory and Volume hits, syntheses, Files API calls, index statements,
NOTIFY messages and deliveries. The rules are the proxy's own (proxy/routes/speak.py, fleet/):

- a request is served from its worker's memory; else it joins a fill of the key in flight
  (the whole fleet's with fleet fills, else only its own process's); else the Volume (a
  Databricks hit is 2 Files API calls, sidecar and object; promoted into memory); else a
  synthesis (3 Files API calls to store it: object, sidecar, the folder's listing; an index row,
  a lease taken and given back, a stored notice to every other process);
- with fleet fills a fill's recording goes into its owner's memory and a copy into every worker
  that asked for it; another replica that waited reads it from the Volume once (2 calls);
- `memory = "owner"` and `"copies+owner"` model the alternatives not built: only the key's
  owner keeps it in memory and the others ask it (one socket hop), or each worker keeps its
  copies and asks the owner's memory before the Volume.

Prints two Markdown tables, the fleet as users grow and the memory alternatives
(docs/scaling.md reads them). Deterministic per seed.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from bench.chat_trace import CHAT, REPLAY_HEAVY, Request, Workload, trace

MIB: Final = 1024 * 1024
# The workspace's Files API budget every replica shares (proxy/storage/databricks/limiter.py).
FILES_API_CALLS_PER_SECOND: Final = 100.0
READ_CALLS: Final = 2  # sidecar, object
WRITE_CALLS: Final = 2  # the object, then its sidecar
MISS_CALLS_WITHOUT_INDEX: Final = 1  # the sidecar's 404


@dataclass(frozen=True)
class Fleet:
    """Replicas of `serve --workers N` on one Volume and one index."""

    replicas: int
    workers: int = 2
    memory_bytes: int = 256 * MIB  # per worker (cache.memory.max_bytes)
    connection_seconds: float = 300.0  # how long a client keeps a connection (0: one a request)
    fleet_fills: bool = True
    # copies: each worker keeps what it serves (the proxy); owner: only the key's owner keeps it,
    # the others ask it over its socket; copies+owner: a worker's own copy, else the owner's
    # memory before the Volume (the two alternatives are not built).
    memory: str = "copies"
    index: bool = True  # lookups through the index: a miss costs no Files API call

    @property
    def processes(self) -> int:
        """Worker processes in all."""
        return self.replicas * self.workers


class Memory:
    """One worker's memory tier: an LRU bounded by bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.entries: OrderedDict[int, int] = OrderedDict()

    def get(self, key: int) -> bool:
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        return False

    def put(self, key: int, size: int) -> None:
        if size > self.limit or key in self.entries:
            return
        self.entries[key] = size
        self.used += size
        while self.used > self.limit:
            _, dropped = self.entries.popitem(last=False)
            self.used -= dropped


@dataclass
class Tally:
    """What the fleet did with the trace."""

    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    syntheses: Counter[int] = field(default_factory=Counter)
    files_reads: int = 0
    files_writes: int = 0
    index_reads: int = 0
    index_writes: int = 0
    notify_messages: int = 0
    notify_deliveries: int = 0
    hits_by_worker_second: set[tuple[int, int]] = field(default_factory=set)
    entries_held: int = 0
    distinct_held: int = 0
    owner_hops: int = 0
    seconds: float = 0.0


class Fill:
    """A synthesis in flight: when it commits, who asked (workers), which replicas wait."""

    __slots__ = ("asked", "end", "key", "owner", "process", "size", "waiting")

    def __init__(self, key: int, size: int, end: float, owner: int, process: int) -> None:
        self.key = key
        self.size = size
        self.end = end
        self.owner = owner
        self.process = process
        self.asked: set[int] = set()
        self.waiting: set[int] = set()

    def __lt__(self, other: Fill) -> bool:
        return self.end < other.end


def simulate(workload: Workload, fleet: Fleet) -> Tally:
    """Replay `workload` through `fleet`."""
    tally = Tally(seconds=workload.minutes * 60)
    memories = [Memory(fleet.memory_bytes) for _ in range(fleet.processes)]
    stored = {
        user * 1_000_000 + n for user in range(workload.users) for n in range(workload.history)
    }
    in_flight: dict[tuple[int, int], Fill] = {}  # (scope, key): scope -1 fleet-wide, else process
    ending: list[Fill] = []
    rng = random.Random(f"{workload.seed}|routing")
    connections: dict[int, tuple[int, float]] = {}

    def route(request: Request) -> int:
        held = connections.get(request.user)
        if request.duplicate or held is None or request.at >= held[1]:
            process = rng.randrange(fleet.processes)
            if not request.duplicate:
                connections[request.user] = (process, request.at + fleet.connection_seconds)
            return process
        return held[0]

    def owner(process: int, key: int) -> int:
        replica = process // fleet.workers
        digest = hashlib.blake2b(key.to_bytes(8, "big"), digest_size=4).digest()
        return replica * fleet.workers + int.from_bytes(digest, "big") % fleet.workers

    def holder(process: int, key: int) -> int:
        return owner(process, key) if fleet.memory == "owner" else process

    def commit(fill: Fill) -> None:
        stored.add(fill.key)
        tally.files_writes += WRITE_CALLS
        tally.index_writes += 1 + (2 if fleet.fleet_fills else 0)  # the row; a lease pair
        tally.notify_messages += 1
        tally.notify_deliveries += fleet.processes - 1
        for process in {fill.owner, *fill.asked}:
            memories[holder(process, fill.key)].put(fill.key, fill.size)
        for process in fill.waiting:  # another replica's owner reads the Volume once
            tally.files_reads += READ_CALLS
            memories[holder(process, fill.key)].put(fill.key, fill.size)
        del in_flight[(-1 if fleet.fleet_fills else fill.process, fill.key)]

    for request in trace(workload):
        while ending and ending[0].end <= request.at:
            commit(heapq.heappop(ending))
        tally.requests += 1
        process = route(request)
        key = request.key
        if holder(process, key) != process:
            tally.owner_hops += 1  # the owner's memory, asked over its socket
        if memories[holder(process, key)].get(key):
            tally.outcomes["memory"] += 1
            tally.hits_by_worker_second.add((process, int(request.at)))
            continue
        second = owner(process, key)
        if fleet.memory == "copies+owner" and second != process:
            tally.owner_hops += 1
            if memories[second].get(key):
                tally.outcomes["memory"] += 1
                memories[process].put(key, request.size)
                continue
        scope = -1 if fleet.fleet_fills else process
        fill = in_flight.get((scope, key))
        if fill is not None:
            tally.outcomes["joined"] += 1
            replica = process // fleet.workers
            if replica == fill.owner // fleet.workers:
                fill.asked.add(process)
            else:
                fill.waiting.add(owner(process, key))
                fill.asked.add(process)
                tally.index_reads += 1  # the lease found held
            continue
        if fleet.index:
            tally.index_reads += 1  # is it stored?
        if key in stored:
            tally.outcomes["volume"] += 1
            tally.files_reads += READ_CALLS
            memories[holder(process, key)].put(key, request.size)
            if fleet.memory == "copies+owner":
                memories[second].put(key, request.size)  # the owner read it
            tally.hits_by_worker_second.add((process, int(request.at)))
            continue
        if not fleet.index:
            tally.files_reads += MISS_CALLS_WITHOUT_INDEX
        tally.outcomes["synthesized"] += 1
        tally.syntheses[key] += 1
        lead = owner(process, key) if fleet.fleet_fills else process
        fill = Fill(key, request.size, request.at + workload.synthesis_seconds, lead, process)
        fill.asked.add(process)
        in_flight[(scope, key)] = fill
        heapq.heappush(ending, fill)
    while ending:
        commit(heapq.heappop(ending))
    tally.entries_held = sum(len(m.entries) for m in memories)
    tally.distinct_held = len(set().union(*(m.entries for m in memories)))
    # Hit counts reach the index in one UPDATE per worker per second with hits.
    tally.index_writes += len(tally.hits_by_worker_second)
    return tally


def scale_row(workload: Workload, fleet: Fleet, tally: Tally) -> str:
    """A row of the scale table: the configuration, then what the fleet saw."""
    n, seconds = tally.requests, tally.seconds
    synthesized = tally.outcomes["synthesized"]
    per_key = synthesized / max(1, len(tally.syntheses))
    files = (tally.files_reads + tally.files_writes) / seconds
    at_budget = workload.users * FILES_API_CALLS_PER_SECOND / files
    return (
        f"| {workload.name} | {workload.users:,} | {fleet.replicas} x {fleet.workers} | "
        f"{_routing(fleet)} | {'on' if fleet.fleet_fills else 'off'} | {n / seconds:,.0f} | "
        f"{tally.outcomes['memory'] / n:.2f} | {tally.outcomes['volume'] / n:.2f} | "
        f"{tally.outcomes['joined'] / n:.3f} | {1 - synthesized / n:.2f} | {per_key:.3f} | "
        f"{files:,.0f} ({tally.files_writes / seconds:,.0f}) | {at_budget:,.0f} | "
        f"{tally.index_writes / seconds:,.0f} | {tally.notify_messages / seconds:,.0f} / "
        f"{tally.notify_deliveries / seconds:,.0f} |"
    )


SCALE_HEADER: Final = (
    "| workload | users | replicas x workers | routing | fleet fills | req/s | memory hits "
    "| Volume hits "
    "| joined | served without synthesis | syntheses per key | Files API calls/s (writes) "
    "| users at the Files API budget | index writes/s | NOTIFY messages / deliveries per s |\n"
    "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
    "| ---: | ---: |"
)


def memory_row(workload: Workload, fleet: Fleet, tally: Tally) -> str:
    """A row of the memory table: each worker's copies, the owner's memory, or both."""
    n, seconds = tally.requests, tally.seconds
    return (
        f"| {workload.name} | {workload.users:,} | {fleet.replicas} x {fleet.workers} | "
        f"{fleet.memory_bytes // MIB} MiB | {_routing(fleet)} | {fleet.memory} | "
        f"{tally.outcomes['memory'] / n:.2f} | {tally.files_reads / seconds:,.1f} | "
        f"{tally.entries_held / max(1, tally.distinct_held):.2f} | "
        f"{tally.owner_hops / n:.2f} |"
    )


MEMORY_HEADER: Final = (
    "| workload | users | replicas x workers | memory per worker | routing | memory "
    "| memory hits "
    "| Files API reads/s | copies per entry held | requests through a socket hop |\n"
    "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"
)


def _routing(fleet: Fleet) -> str:
    if not fleet.connection_seconds:
        return "per request"
    return f"kept {fleet.connection_seconds:g} s"


def scale_scenarios(users: Sequence[int], minutes: float) -> Iterator[tuple[Workload, Fleet]]:
    """How the fleet's load grows with active users (a replica per thousand), per workload."""
    for shape in (CHAT, REPLAY_HEAVY):
        for count in users:
            work = replace(shape, users=count, minutes=minutes)
            base = Fleet(replicas=max(1, count // 1000))
            yield work, base
            yield work, replace(base, connection_seconds=0.0)
            yield work, replace(base, fleet_fills=False)


def memory_scenarios(minutes: float) -> Iterator[tuple[Workload, Fleet]]:
    """Each worker's copies, the owner's memory only, or both, as memory gets scarce."""
    work = replace(REPLAY_HEAVY, users=1000, minutes=minutes)
    for memory in (256 * MIB, 32 * MIB):
        for seconds in (300.0, 0.0):
            for policy in ("copies", "owner", "copies+owner"):
                yield work, Fleet(1, 4, memory, connection_seconds=seconds, memory=policy)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios and print the tables."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_replay", description=__doc__)
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--minutes", type=float, default=20.0, help="simulated minutes")
    args = parser.parse_args(argv)
    for shape in (CHAT, REPLAY_HEAVY):
        print(f"- {shape.name}: {replace(shape, minutes=args.minutes).describe()}")
    print()
    print(SCALE_HEADER)
    for workload, fleet in scale_scenarios(args.users, args.minutes):
        print(scale_row(workload, fleet, simulate(workload, fleet)), flush=True)
    print()
    print(MEMORY_HEADER)
    for workload, fleet in memory_scenarios(args.minutes):
        print(memory_row(workload, fleet, simulate(workload, fleet)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
