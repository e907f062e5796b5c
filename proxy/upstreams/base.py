"""The Upstream protocol: whoever produces the response stream for a speak miss."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
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


class Upstream(Protocol):
    """Produces the response stream for a speak miss."""

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """Start the upstream call; raises UpstreamError when no response can be had."""
        ...
