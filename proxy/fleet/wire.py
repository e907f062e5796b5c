"""The wire between a worker and a key's owner: a miss asked of the owner, answered in frames.

A worker that misses a key another worker of its group owns posts the miss to the owner's socket
(`POST /fleet/fills`): a length-prefixed JSON head (the recording asked for and the call's plain
values) then the body to send upstream. The owner answers 200 at once and streams frames, each
one byte of kind, four bytes of length, then the payload:

    A  accepted: the owner has the miss        K  keepalive: the owner is alive, nothing new
    H  the response's head (JSON: status, reason, headers, upstream_seconds, joined, stored)
    E  no response (JSON: status, detail, headers, upstream_seconds): the upstream's error
    D  a body chunk                            Z  the body ended whole
    B  the body broke: whoever reads it must not take it for complete

Frames let the asker tell a live owner from a hung one at any moment, not only before the head
(which waits for the synthesis): an owner silent for `fleet.owner_timeout_seconds` is hung.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from multidict import CIMultiDict

from proxy.fill import FlightKey
from proxy.identity import Identity
from proxy.speak import CacheKey, SpeakRequest
from proxy.upstreams.base import SpeakCall

FILLS_PATH: Final = "/fleet/fills"
ACCEPTED: Final = b"A"
KEEPALIVE: Final = b"K"
HEAD: Final = b"H"
ERROR: Final = b"E"
DATA: Final = b"D"
END: Final = b"Z"
BROKEN: Final = b"B"
KINDS: Final = frozenset({ACCEPTED, KEEPALIVE, HEAD, ERROR, DATA, END, BROKEN})
_PREFIX = struct.Struct(">cI")
_LENGTH = struct.Struct(">I")
# A frame's payload is a chunk of a fill (aiohttp hands a few KiB to 64 KiB) or a small JSON.
MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
MAX_HEAD_BYTES: Final = 1024 * 1024
# A miss asked of the owner: its head and a speak body (tts.max_body_bytes, 1 MiB by default).
MAX_ASK_BYTES: Final = 64 * 1024 * 1024


class BadFrame(ValueError):
    """What came over the socket is not what this version of the wire says."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame: its kind, its length, its payload."""
    return _PREFIX.pack(kind, len(payload)) + payload


def frame_prefix(prefix: bytes) -> tuple[bytes, int]:
    """A frame's kind and payload length from its five first bytes; BadFrame when invalid."""
    kind, length = _PREFIX.unpack(prefix)
    if kind not in KINDS or length > MAX_FRAME_BYTES:
        raise BadFrame(f"frame {kind!r} of {length} bytes")
    return kind, length


@dataclass(frozen=True)
class FillAsk:
    """One miss asked of the key's owner: the recording it is for and the upstream call."""

    flight: FlightKey
    call: SpeakCall

    def to_bytes(self) -> bytes:
        """The request body: the JSON head's length, the head, then the call's body."""
        key, text_sha256, provider = self.flight
        call = self.call
        identity = call.identity
        head = {
            "key": list(key),
            "text_sha256": text_sha256,
            "provider": provider,
            "raw_path": call.raw_path,
            "headers": [[name, value] for name, value in call.headers.items()],
            "request_id": call.request_id,
            "speak": call.speak._asdict(),
            "user": identity.user if identity is not None else None,
            "token": identity.token if identity is not None else None,
        }
        encoded = json.dumps(head, separators=(",", ":")).encode()
        return _LENGTH.pack(len(encoded)) + encoded + call.body

    @classmethod
    def from_bytes(cls, data: bytes) -> FillAsk:
        """Read a request body; BadFrame unless every part is valid."""
        if len(data) < _LENGTH.size:
            raise BadFrame("no head")
        (length,) = _LENGTH.unpack_from(data)
        if length > MAX_HEAD_BYTES or len(data) < _LENGTH.size + length:
            raise BadFrame("head length")
        try:
            head = json.loads(data[_LENGTH.size : _LENGTH.size + length])
            return cls._from_head(head, data[_LENGTH.size + length :])
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            if isinstance(exc, BadFrame):
                raise
            raise BadFrame(f"bad head: {type(exc).__name__}") from None

    @classmethod
    def _from_head(cls, head: dict[str, Any], body: bytes) -> FillAsk:
        key = CacheKey(*(_text(part) for part in head["key"]))
        if not key.valid():
            raise BadFrame("invalid key")
        provider = head["provider"]
        if provider is not None:
            provider = _text(provider)
        speak = SpeakRequest(**head["speak"])
        headers: CIMultiDict[str] = CIMultiDict(
            (_text(name), _text(value)) for name, value in head["headers"]
        )
        user, token = head["user"], head["token"]
        identity = Identity(_text(user), _text(token) if token else None) if user else None
        call = SpeakCall(
            raw_path=_text(head["raw_path"]),
            headers=headers,
            request_id=_text(head["request_id"]),
            body=body,
            speak=speak,
            identity=identity,
        )
        return cls((key, _text(head["text_sha256"]), provider), call)


@dataclass(frozen=True)
class Head:
    """The head of the owner's answer: the fill's response, and how this ask got it.

    `joined`: the answer is another request's fill (the owner's, another replica's, or the
    owner's memory), so the asker's clients get what a joined client gets; `stored`: the owner
    keeps it (memory, Volume), so the asker may keep a copy in memory.
    """

    status: int
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    upstream_seconds: float | None
    joined: bool
    stored: bool

    def to_bytes(self) -> bytes:
        """The H frame's payload."""
        data = {
            "status": self.status,
            "reason": self.reason,
            "headers": [list(pair) for pair in self.headers],
            "upstream_seconds": self.upstream_seconds,
            "joined": self.joined,
            "stored": self.stored,
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> Head:
        """Read an H frame's payload; BadFrame when malformed."""
        try:
            data = json.loads(payload)
            status = int(data["status"])
            reason = data["reason"]
            seconds = data["upstream_seconds"]
            return cls(
                status=status,
                reason=None if reason is None else _text(reason),
                headers=tuple((_text(n), _text(v)) for n, v in data["headers"]),
                upstream_seconds=None if seconds is None else float(seconds),
                joined=bool(data["joined"]),
                stored=bool(data["stored"]),
            )
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise BadFrame(f"bad head frame: {type(exc).__name__}") from None


def error_payload(
    status: int, detail: str, headers: dict[str, str], upstream_seconds: float | None
) -> bytes:
    """The E frame's payload: the UpstreamError the owner's fill ended with."""
    data = {
        "status": status,
        "detail": detail,
        "headers": headers,
        "upstream_seconds": upstream_seconds,
    }
    return json.dumps(data, separators=(",", ":")).encode()


def read_error(payload: bytes) -> tuple[int, str, dict[str, str], float | None]:
    """An E frame's status, detail, headers and upstream seconds; BadFrame when malformed."""
    try:
        data = json.loads(payload)
        seconds = data["upstream_seconds"]
        headers = {_text(k): _text(v) for k, v in data["headers"].items()}
        return (
            int(data["status"]),
            _text(data["detail"]),
            headers,
            None if seconds is None else float(seconds),
        )
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise BadFrame(f"bad error frame: {type(exc).__name__}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadFrame("expected a string")
    return value
