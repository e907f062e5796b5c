"""Fill: one upstream response shared by readers, whatever happens to any one of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict

from proxy.fill import Fill, Flights
from proxy.speak import CacheKey, SpeakRequest
from proxy.storage.base import Entry
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

    async def open(self, call: SpeakCall) -> SlowAudio:
        return self

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await self.release.get()
            yield chunk

    def close(self) -> None:
        pass


def call() -> SpeakCall:
    return SpeakCall(request=Any, body=b"{}", speak=SPEAK, identity=None, headers=CIMultiDict())  # type: ignore[arg-type]


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
    fill = Fill(KEY, call(), max_entry_bytes=1000, on_commit=lambda k, e: stored.append(e))
    flights = Flights()
    first = asyncio.create_task(read_all(fill))
    second = asyncio.create_task(read_all(fill))
    flights.start((KEY, SPEAK.text_sha256(), None), fill, upstream)
    upstream.release.put_nowait(None)
    await asyncio.sleep(0.01)
    first.cancel()  # a reader waiting for the next chunk goes away
    await asyncio.sleep(0.01)
    upstream.release.put_nowait(None)
    upstream.release.put_nowait(None)
    assert await second == b"a" * 10 + b"b" * 10 + b"c" * 10
    await flights.aclose()
    assert len(stored) == 1 and stored[0].body == await asyncio.wait_for(second, 1)
    assert first.cancelled()


async def test_nothing_is_stored_when_the_length_falls_short() -> None:
    upstream = SlowAudio([b"a" * 10])
    upstream.headers["Content-Length"] = "20"
    stored: list[Entry] = []
    fill = Fill(KEY, call(), max_entry_bytes=1000, on_commit=lambda k, e: stored.append(e))
    reader = asyncio.create_task(read_all(fill))
    Flights().start((KEY, "x", None), fill, upstream)
    upstream.release.put_nowait(None)
    try:
        await reader
    except Exception as exc:
        assert type(exc).__name__ == "FillBroken"
    else:
        raise AssertionError("a short body must not read as complete")
    assert stored == []
