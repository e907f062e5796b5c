"""The wire between a worker and a key's owner: what one sends, the other reads back exactly;
anything else is refused with a clear error."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.fleet.wire import (
    DATA,
    BadFrame,
    FillAsk,
    Head,
    error_payload,
    frame,
    frame_prefix,
    read_error,
)
from proxy.identity import Identity
from proxy.speak import CacheKey, SpeakRequest
from proxy.upstreams.base import SpeakCall

KEY = CacheKey("alice@example.com", "t-1", "m-1", "af_nicole")
SPEAK = SpeakRequest("Hello", "af_nicole", "replicate", "m-1", "t-1", True)


def ask(body: bytes = b'{"text": "Hello"}') -> FillAsk:
    headers = CIMultiDict([("Cookie", "a=1"), ("Cookie", "b=2"), ("Origin", "https://a.example")])
    call = SpeakCall("/api/tts/speak?x=1", headers, "req-1", body, SPEAK, Identity("alice", "tok"))
    return FillAsk((KEY, "f" * 64, "replicate"), call)


def test_an_ask_reads_back_as_sent() -> None:
    sent = ask(b"\x00\xffnot even JSON")
    received = FillAsk.from_bytes(sent.to_bytes())
    assert received.flight == sent.flight
    call = received.call
    assert call.raw_path == "/api/tts/speak?x=1" and call.request_id == "req-1"
    assert call.headers.getall("Cookie") == ["a=1", "b=2"]
    assert call.body == b"\x00\xffnot even JSON"
    assert call.speak == SPEAK and call.identity == Identity("alice", "tok")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x10{}",
        b"\x00\x00\x00\x02{}",
        b"\x00\x00\x00\x04null",
        b"\xff\xff\xff\xff" + b"x" * 10,
    ],
)
def test_a_malformed_ask_is_refused(data: bytes) -> None:
    with pytest.raises(BadFrame):
        FillAsk.from_bytes(data)


def test_an_ask_for_an_invalid_key_is_refused() -> None:
    sent = ask()
    bad = FillAsk((CacheKey("../x", "t-1", "m-1", "af_nicole"), "f" * 64, None), sent.call)
    with pytest.raises(BadFrame, match="invalid key"):
        FillAsk.from_bytes(bad.to_bytes())


def test_frames_heads_and_errors_read_back() -> None:
    encoded = frame(DATA, b"audio")
    assert frame_prefix(encoded[:5]) == (DATA, 5) and encoded[5:] == b"audio"
    head = Head(200, "OK", (("Content-Type", "audio/mpeg"),), 0.25, joined=True, stored=False)
    assert Head.from_bytes(head.to_bytes()) == head
    payload = error_payload(503, "busy", {"Retry-After": "1"}, None)
    assert read_error(payload) == (503, "busy", {"Retry-After": "1"}, None)


@pytest.mark.parametrize("prefix", [b"Q\x00\x00\x00\x00", b"D\x7f\xff\xff\xff"])
def test_an_unknown_or_oversized_frame_is_refused(prefix: bytes) -> None:
    with pytest.raises(BadFrame):
        frame_prefix(prefix)


def test_a_malformed_head_or_error_is_refused() -> None:
    with pytest.raises(BadFrame):
        Head.from_bytes(b'{"status": "x"}')
    with pytest.raises(BadFrame):
        read_error(b"[]")
