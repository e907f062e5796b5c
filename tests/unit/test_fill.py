"""Fill: one upstream response shared by readers, whatever happens to any one of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from multidict import CIMultiDict

from proxy.fill import Fill, Flights
from proxy.speak import CacheKey, SpeakRequest
from proxy.storage.entry import Entry
from proxy.upstreams.base import SpeakCall

KEY = CacheKey("alice@example.com", "t-1", "m-1", "af_nicole")
SPEAK = SpeakRequest("hi", "af_nicole", None, "m-1", "t-1", True)


class SlowAudio:
    """An upstream whose chunks arrive one by one, when the test releases them."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.release = asyncio.Queue[None]()
        self.status = 200
        self.reason = "OK"
        total = str(sum(len(c) for c in chunks))
        self.headers = CIMultiDict({"Content-Type": "audio/mpeg", "Content-Length": total})
        self.upstream_seconds: float | None = None

    async def open(self, call: SpeakCall) -> SlowAudio:
        return self

    def read_buffered(self) -> bytes:
        return b""

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await self.release.get()
            yield chunk

    def body_complete(self) -> bool:
        return False

    def close(self) -> None:
        pass


def call() -> SpeakCall:
    return SpeakCall(
        raw_path="/api/tts/speak",
        headers=CIMultiDict(),
        request_id="r-1",
        body=b"{}",
        speak=SPEAK,
        identity=None,
    )


async def read_all(fill: Fill) -> bytes:
    reader = fill.reader()
    try:
        await fill.wait_ready()
        return b"".join([chunk async for chunk in reader])
    finally:
        reader.close()


async def test_a_cancelled_reader_does_not_disturb_the_others() -> None:
    upstream = SlowAudio([b"a" * 10, b"b" * 10, b"c" * 10])
    stored: list[Entry] = []
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: stored.append(e),
    )
    flights = Flights()
    first = asyncio.create_task(read_all(fill))
    second = asyncio.create_task(read_all(fill))
    lead = asyncio.create_task(flights.lead((KEY, SPEAK.text_sha256(), None), fill, upstream))
    upstream.release.put_nowait(None)
    await asyncio.sleep(0.01)
    first.cancel()  # a reader waiting for the next chunk goes away
    await asyncio.sleep(0.01)
    upstream.release.put_nowait(None)
    upstream.release.put_nowait(None)
    assert await second == b"a" * 10 + b"b" * 10 + b"c" * 10
    await lead
    await flights.aclose()
    assert len(stored) == 1 and stored[0].body == await asyncio.wait_for(second, 1)
    assert first.cancelled()


async def test_nothing_is_stored_when_the_length_falls_short() -> None:
    upstream = SlowAudio([b"a" * 10])
    upstream.headers["Content-Length"] = "20"
    stored: list[Entry] = []
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: stored.append(e),
    )
    reader = asyncio.create_task(read_all(fill))
    lead = asyncio.create_task(Flights().lead((KEY, "x", None), fill, upstream))
    upstream.release.put_nowait(None)
    try:
        await reader
    except Exception as exc:
        assert type(exc).__name__ == "FillBroken"
    else:
        raise AssertionError("a short body must not read as complete")
    await lead
    assert stored == []


class HeadWithBody(SlowAudio):
    """An upstream whose first chunk came with the head (read_buffered), the rest released."""

    def __init__(self, first: bytes, rest: list[bytes]) -> None:
        super().__init__(rest)
        self.first = first
        self.headers["Content-Length"] = str(len(first) + sum(len(c) for c in rest))
        self.opened = asyncio.Event()
        self.answer = asyncio.Event()

    async def open(self, call: SpeakCall) -> HeadWithBody:
        self.opened.set()
        await self.answer.wait()
        return self

    def read_buffered(self) -> bytes:
        first, self.first = self.first, b""
        return first


class WholeWithHead(HeadWithBody):
    """An upstream whose whole body came with the head (a short answer)."""

    def __init__(self, body: bytes, *, length: int | None = None) -> None:
        super().__init__(body, [])
        self.headers["Content-Length"] = str(len(body) if length is None else length)
        self.answer.set()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        raise AssertionError("a whole body needs no more reading")
        yield b""  # pragma: no cover

    def body_complete(self) -> bool:
        return True


async def test_a_body_that_came_whole_with_the_head_ends_the_fill_in_the_same_turn() -> None:
    stored: list[Entry] = []
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: stored.append(e),
    )
    flights = Flights()
    flight = (KEY, SPEAK.text_sha256(), None)
    reader = fill.reader()

    await flights.lead(flight, fill, WholeWithHead(b"short audio"))

    # Stored and out of the flight table before lead() returned: no body task was needed.
    assert fill.done and fill.task is None and flights.joinable(flight) is None
    assert [e.body for e in stored] == [b"short audio"]
    assert [chunk async for chunk in reader] == [b"short audio"]


async def test_a_whole_body_shorter_than_its_length_is_neither_stored_nor_complete() -> None:
    stored: list[Entry] = []
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: stored.append(e),
    )
    reader = fill.reader()

    await Flights().lead((KEY, SPEAK.text_sha256(), None), fill, WholeWithHead(b"cut", length=9))

    assert fill.broken and stored == []
    chunks = aiter(reader)
    assert await anext(chunks) == b"cut"
    try:
        await anext(chunks)
    except Exception as exc:
        assert type(exc).__name__ == "FillBroken"
    else:
        raise AssertionError("a short body must not read as complete")


async def test_the_leader_opens_in_its_own_task_and_gets_the_first_chunk_at_once() -> None:
    upstream = HeadWithBody(b"a" * 10, [b"b" * 10])
    stored: list[Entry] = []
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: stored.append(e),
    )
    flights = Flights()
    flight = (KEY, SPEAK.text_sha256(), None)
    leader = fill.reader()
    lead = asyncio.create_task(flights.lead(flight, fill, upstream))
    await upstream.opened.wait()
    assert flights.joinable(flight) is fill  # joinable while the head is awaited
    joiner = asyncio.create_task(read_all(fill))
    upstream.answer.set()
    await lead
    # Back from lead(), the head and the chunk that came with it are there: no wait, no task.
    assert fill.status == 200 and fill.task is not None
    chunks = aiter(leader)
    assert await asyncio.wait_for(anext(chunks), 1) == b"a" * 10
    upstream.release.put_nowait(None)
    assert await asyncio.wait_for(anext(chunks), 1) == b"b" * 10
    leader.close()
    assert await asyncio.wait_for(joiner, 1) == b"a" * 10 + b"b" * 10
    await flights.aclose()
    assert [entry.body for entry in stored] == [b"a" * 10 + b"b" * 10]
    assert flights.joinable(flight) is None and len(flights) == 0


async def test_a_first_chunk_over_the_entry_limit_still_reaches_the_leader() -> None:
    upstream = HeadWithBody(b"a" * 50, [])
    upstream.answer.set()
    stored: list[Entry] = []
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=20,
        on_commit=lambda k, e: stored.append(e),
    )
    leader = fill.reader()
    await Flights().lead((KEY, "x", None), fill, upstream)
    assert not fill.joinable  # too large to join from the first byte
    assert b"".join([chunk async for chunk in leader]) == b"a" * 50
    assert stored == []


async def test_a_lead_cancelled_while_opening_fails_the_joined_readers() -> None:
    upstream = HeadWithBody(b"a", [])
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: None,
    )
    flights = Flights()
    flight = (KEY, "x", None)
    lead = asyncio.create_task(flights.lead(flight, fill, upstream))
    await upstream.opened.wait()
    joiner = fill.reader()
    lead.cancel()
    await asyncio.gather(lead, return_exceptions=True)
    await asyncio.wait_for(fill.wait_ready(), 1)
    assert fill.error is not None and fill.error.status == 502
    assert [chunk async for chunk in joiner] == []
    assert flights.joinable(flight) is None and len(flights) == 0


async def test_with_joined_readers_the_first_bytes_go_to_all_from_the_body_task() -> None:
    upstream = HeadWithBody(b"a" * 10, [b"b" * 10])
    upstream.answer.set()
    fill = Fill(
        KEY,
        call(),
        text_sha256=SPEAK.text_sha256(),
        max_entry_bytes=1000,
        on_commit=lambda k, e: None,
    )
    leader, joiner = fill.reader(), fill.reader()
    await Flights().lead((KEY, "x", None), fill, upstream)
    # Not handed to the leader alone: the joined clients prepare their responses first.
    assert fill.received == 0 and fill.status == 200
    first = [asyncio.create_task(anext(aiter(reader))) for reader in (leader, joiner)]
    assert await asyncio.wait_for(asyncio.gather(*first), 1) == [b"a" * 10, b"a" * 10]
    upstream.release.put_nowait(None)
    assert fill.task is not None
    await asyncio.wait_for(fill.task, 1)
    assert fill.received == 20 and not fill.broken
