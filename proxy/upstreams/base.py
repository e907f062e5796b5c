"""The Upstream protocol: whoever produces the response stream for a speak miss."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.identity import Identity
from proxy.speak import SpeakRequest


class UpstreamError(Exception):
    """The upstream could not answer: `status` is what the client gets (502 or 504)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SpeakCall:
    """One speak miss to synthesize: the client's request, the body to send, what it asks."""

    request: web.Request
    body: bytes
    speak: SpeakRequest
    identity: Identity | None
    headers: CIMultiDict[str] | CIMultiDictProxy[str]


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

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, as it arrives; raises on a broken stream."""
        ...

    def close(self) -> None:
        """Stop reading and release the connection."""


class Upstream(Protocol):
    """Produces the response stream for a speak miss."""

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """Start the upstream call; raises UpstreamError when no response can be had."""
        ...
