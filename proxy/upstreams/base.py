"""The Upstream protocol: whoever produces the response stream for a speak miss."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.identity import Identity
from proxy.speak import SpeakRequest


class UpstreamError(Exception):
    """The upstream could not answer: `status` is what the client gets (502, 503 or 504).

    `upstream_seconds` is how long the upstream was waited for, when that was timed; `headers`
    go on the client's answer (a 503's Retry-After).
    """

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        upstream_seconds: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.upstream_seconds = upstream_seconds
        self.headers: dict[str, str] = dict(headers or {})


@dataclass(frozen=True, slots=True)
class SpeakCall:
    """One speak miss to synthesize, as plain values taken from the client's request."""

    raw_path: str
    """The path and query to ask the upstream for, as the client sent them."""
    headers: CIMultiDict[str] | CIMultiDictProxy[str]
    """The request headers to forward, X-Forwarded-*, Via and X-Request-Id included; no framing
    headers (the upstream frames `body` itself)."""
    request_id: str
    body: bytes
    speak: SpeakRequest
    identity: Identity | None


class UpstreamResponse(Protocol):
    """A response whose body arrives as a stream of chunks."""

    @property
    def status(self) -> int:
        """The HTTP status."""
        ...

    @property
    def reason(self) -> str | None:
        """The reason phrase."""
        ...

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        """The response headers, repeated ones included."""
        ...

    @property
    def upstream_seconds(self) -> float | None:
        """Time from sending the request to the response's head, when the upstream timed it."""
        ...

    def read_buffered(self) -> bytes:
        """The body bytes that arrived with the head, without waiting (may be empty); they are
        not yielded again by iter_chunks."""
        ...

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, as it arrives; raises on a broken stream."""
        ...

    def body_complete(self) -> bool:
        """True when read_buffered took the whole body and it ended in order: iter_chunks would
        yield nothing more and raise nothing. False whenever that is not known."""
        ...

    def close(self) -> None:
        """Stop reading and release the connection."""


class ClosingResponse:
    """An upstream response that calls `on_close` once it is closed (a slot given back, a fill
    told its upstream is done), whatever closing the response raised."""

    __slots__ = ("_on_close", "_response")

    def __init__(self, response: UpstreamResponse, on_close: Callable[[], None]) -> None:
        self._response = response
        self._on_close = on_close

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self._response.status

    @property
    def reason(self) -> str | None:
        """The reason phrase."""
        return self._response.reason

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        """The response headers."""
        return self._response.headers

    @property
    def upstream_seconds(self) -> float | None:
        """Time to the response's head."""
        return self._response.upstream_seconds

    def read_buffered(self) -> bytes:
        """The body bytes that came with the head."""
        return self._response.read_buffered()

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body as it arrives."""
        return self._response.iter_chunks()

    def body_complete(self) -> bool:
        """Whether read_buffered took the whole body."""
        return self._response.body_complete()

    def close(self) -> None:
        """Close the response, then call `on_close`."""
        try:
            self._response.close()
        finally:
            self._on_close()


class Upstream(Protocol):
    """Produces the response stream for a speak miss."""

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """Start the upstream call; raises UpstreamError when no response can be had."""
        ...
