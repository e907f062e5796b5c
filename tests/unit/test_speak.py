"""The /speak contract: fields, cacheability, ids."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy import cacheable_key
from proxy.speak import CacheKey, SpeakRequest, parse_json_object, valid_id

BODY = {
    "text": "Hello",
    "provider": "Replicate",
    "voice": "af_nicole",
    "message_id": "m-1",
    "thread_id": "t-1",
    "save_to_volume": True,
}


def test_fields_and_key() -> None:
    speak = SpeakRequest.from_json(BODY, "af_bella")
    assert speak.provider == "replicate"
    assert cacheable_key(speak, "a@b.com") == CacheKey("a@b.com", "t-1", "m-1", "af_nicole")


def test_default_voice() -> None:
    speak = SpeakRequest.from_json({**BODY, "voice": None}, "af_bella")
    assert speak.voice == "af_bella"


@pytest.mark.parametrize(
    "change",
    [
        {"save_to_volume": False},
        {"save_to_volume": "true"},
        {"message_id": None},
        {"thread_id": 7},
        {"text": "   "},
        {"message_id": "../x"},
        {"thread_id": "a/b"},
        {"voice": "x\x00y"},
        {"message_id": "m" * 200},
        {"voice": "é"},
    ],
)
def test_not_cacheable(change: dict[str, object]) -> None:
    assert cacheable_key(SpeakRequest.from_json({**BODY, **change}, "af"), "a@b.com") is None


@pytest.mark.parametrize("user", [None, "", "../etc", "a/b", "x" * 200, "ü@x"])
def test_no_key_without_a_safe_user(user: str | None) -> None:
    assert cacheable_key(SpeakRequest.from_json(BODY, "af"), user) is None


@given(st.text(max_size=300))
def test_valid_ids_are_safe_path_segments(value: str) -> None:
    if valid_id(value):
        assert "/" not in value and "\x00" not in value and ".." not in value
        assert value not in {".", ""} and len(value) <= 128 and value.isascii()


def test_text_digest_ignores_surrounding_space_only() -> None:
    a = SpeakRequest.from_json({**BODY, "text": " Hello "}, "af")
    b = SpeakRequest.from_json({**BODY, "text": "Hello!"}, "af")
    assert a.text_sha256() == SpeakRequest.from_json(BODY, "af").text_sha256()
    assert a.text_sha256() != b.text_sha256()


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    for bad in (b"[1]", b"nope", b"\xff\xfe", b'"s"', b""):
        assert parse_json_object(bad) is None


def test_key_digest_hides_ids() -> None:
    key = CacheKey("alice@example.com", "t-1", "m-1", "af_nicole")
    assert "alice" not in key.digest() and len(key.digest()) == 16
    assert key.audio_path() == "/_proxy/audio/t-1/m-1/af_nicole"
