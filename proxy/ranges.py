"""Byte ranges (RFC 9110 14): the single and suffix forms a media element asks for."""

from __future__ import annotations

from dataclasses import dataclass


class Unsatisfiable(Exception):
    """The range lies outside the representation: answer 416."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range within a representation of `length` bytes."""

    first: int
    last: int
    length: int

    @property
    def size(self) -> int:
        """How many bytes the range covers."""
        return self.last - self.first + 1

    def content_range(self) -> str:
        """The Content-Range header value for a 206."""
        return f"bytes {self.first}-{self.last}/{self.length}"


def parse_range(header: str | None, length: int) -> ByteRange | None:
    """The one range to serve, None to serve the whole body, or raise Unsatisfiable.

    Syntax errors and multiple ranges are ignored (a full 200), as RFC 9110 allows.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    first_text, last_text = first_text.strip(), last_text.strip()
    if not first_text:
        if not last_text.isdigit():
            return None
        suffix = int(last_text)
        if suffix == 0 or length == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, length - suffix), length - 1, length)
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return None
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None
    last = int(last_text) if last_text else length - 1
    if first >= length:
        raise Unsatisfiable()
    return ByteRange(first, min(last, length - 1), length)


def etag_matches(header: str | None, etag: str) -> bool:
    """True when an If-None-Match list names `etag` (weak comparison) or is `*`."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(part.strip().removeprefix("W/") == bare for part in header.split(","))
