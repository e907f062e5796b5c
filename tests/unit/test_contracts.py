"""Speak contracts (proxy/contracts.py) and the key-or-reason decision: pure, no I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import load_settings
from proxy.contracts import Contract, canonical, legacy_contract, speak_contracts
from proxy.policy import decide
from proxy.reasons import Reason
from proxy.settings import ConfigError, Settings
from proxy.speak import CONTENT_THREAD, SHARED_USER, CacheKey, SpeakRequest, valid_id

SECRET = "0123456789abcdef0123456789abcdef"
LEGACY = legacy_contract("/api/tts/speak", Settings())
USER = "alice@example.com"


def contract(toml: str, tmp_path: Path, **env: str) -> Contract:
    path = tmp_path / "c.toml"
    path.write_text(f'[identity]\napi_key_secret = "{SECRET}"\n{toml}')
    return speak_contracts(load_settings(path, env=env))[-1]


def openai(tmp_path: Path, scope: str = "user") -> Contract:
    return contract(
        f'[[tts.routes]]\npath = "/v1/audio/speech"\ncontract = "openai"\nscope = "{scope}"\n',
        tmp_path,
    )


def key_of(c: Contract, body: dict[str, Any], user: str = USER) -> CacheKey | Reason:
    speak = c.read(body)
    return decide(c, speak, user, text_sha256=c.text_sha256(speak.text), max_text_chars=0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
legacy_bodies = st.dictionaries(
    st.sampled_from(
        ["text", "voice", "provider", "message_id", "thread_id", "save_to_volume", "speed"]
    ),
    json_values,
)


@given(legacy_bodies)
def test_the_legacy_contract_reads_exactly_what_the_legacy_reader_reads(
    body: dict[str, Any],
) -> None:
    read = LEGACY.read(body)
    assert read == SpeakRequest.from_json(body, "af_nicole")
    assert LEGACY.text_sha256(read.text) == read.text_sha256()


def test_legacy_calls_with_both_ids_keep_their_message_key() -> None:
    body = {"text": "Hi", "voice": "af_bella", "message_id": "m-1", "thread_id": "t-1"}
    saved = {**body, "save_to_volume": True}
    assert key_of(LEGACY, saved) == CacheKey(USER, "t-1", "m-1", "af_bella")
    assert key_of(LEGACY, body) is Reason.SAVE_DEFAULT_OFF  # tts.save_by_default is false
    assert key_of(LEGACY, {**saved, "message_id": None}) is Reason.INVALID_ID  # one id alone
    # "_text" is the content keys' folder: never a client's thread.
    assert key_of(LEGACY, {**saved, "thread_id": CONTENT_THREAD}) is Reason.INVALID_ID


def test_a_legacy_call_without_ids_gets_a_content_key() -> None:
    body = {"text": "Hello there", "voice": "af_nicole", "save_to_volume": True}
    key = key_of(LEGACY, body)
    assert isinstance(key, CacheKey) and key.is_content and key.user == USER
    assert key.message_id == LEGACY.text_sha256("Hello there")
    assert key.voice.startswith("af_nicole.") and valid_id(key.voice)
    assert key.audio_path() == f"/_proxy/audio/_text/{key.message_id}/{key.voice}"
    # Surrounding space is not another text for the legacy backend, which strips it.
    assert key_of(LEGACY, {**body, "text": "  Hello there \n"}) == key
    others = [
        {**body, "text": "Hello there!"},
        {**body, "voice": "af_bella"},
        {**body, "provider": "deepgram"},
    ]
    assert len({key, *(key_of(LEGACY, other) for other in others)}) == 4
    assert key_of(LEGACY, body, user="bob@example.com") != key


def test_a_content_key_never_takes_a_message_keys_place() -> None:
    content = key_of(LEGACY, {"text": "Hi", "save_to_volume": True})
    assert isinstance(content, CacheKey)
    # The same parts as a message key a client could name: refused before they reach a path.
    forged = {"text": "Hi", "save_to_volume": True, "thread_id": content.thread_id}
    assert key_of(LEGACY, {**forged, "message_id": content.message_id}) is Reason.INVALID_ID
    assert not valid_id(CONTENT_THREAD) and not valid_id(SHARED_USER)
    assert content.digest() != CacheKey(USER, "text", content.message_id, content.voice).digest()


def test_openai_defaults_and_number_forms_are_one_key(tmp_path: Path) -> None:
    c = openai(tmp_path)
    body = {"model": "gpt-4o-mini-tts", "input": "Hello", "voice": "coral"}
    key = key_of(c, body)
    assert isinstance(key, CacheKey) and key.is_content  # saved: the route's default
    same = [
        {**body, "speed": 1},
        {**body, "speed": 1.0},
        {**body, "response_format": "mp3"},
        {**body, "speed": 1e0, "response_format": "mp3"},
    ]
    assert {key_of(c, other) for other in same} == {key}
    different = [
        {**body, "speed": 1.25},
        {**body, "response_format": "wav"},
        {**body, "model": "tts-1"},
        {**body, "instructions": "Speak slowly."},
        {**body, "instructions": ""},  # the API documents no default for instructions
        {**body, "input": "Hello "},  # the text as sent: not stripped
        {**body, "voice": "alloy"},
    ]
    keys = {key_of(c, other) for other in different}
    assert key not in keys and len(keys) == len(different)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"stream_format": "sse"}, Reason.UNDECLARED_FIELD),
        ({"user": "someone"}, Reason.UNDECLARED_FIELD),
        ({"voice": {"id": "voice_123"}}, Reason.INVALID_FIELD),
        ({"voice": None}, Reason.INVALID_FIELD),
        ({"input": "   "}, Reason.NO_TEXT),
        ({"input": 42}, Reason.NO_TEXT),
        ({"voice": "a/b"}, Reason.INVALID_ID),
    ],
)
def test_openai_bodies_that_are_not_keyed(
    change: dict[str, Any], reason: Reason, tmp_path: Path
) -> None:
    body = {"model": "tts-1", "input": "Hello", "voice": "coral", **change}
    assert key_of(openai(tmp_path), body) is reason


def test_the_shared_scope_keys_content_without_the_user(tmp_path: Path) -> None:
    c = openai(tmp_path, scope="shared")
    body = {"model": "tts-1", "input": "Hello", "voice": "coral"}
    key = key_of(c, body)
    assert isinstance(key, CacheKey) and key.user == SHARED_USER and key.is_shared
    assert key_of(c, body, user="_key-" + "0" * 32) == key
    assert key.audio_path().startswith("/_proxy/audio/_shared/")


def test_a_custom_route_reads_nested_fields(tmp_path: Path) -> None:
    c = contract(
        '[[tts.routes]]\npath = "/x/speak"\ncontract = "custom"\ntext = "say.text"\n'
        'voice = "say.voice"\nkey_fields = ["say.pitch"]\nkey_defaults = {"say.pitch" = 0}\n'
        'ignore_fields = ["trace"]\nsave_by_default = true\n',
        tmp_path,
    )
    body = {"say": {"text": "Hi", "voice": "v1"}, "trace": "abc"}
    key = key_of(c, body)
    assert isinstance(key, CacheKey)
    assert key_of(c, {"say": {"text": "Hi", "voice": "v1", "pitch": 0.0}}) == key
    assert key_of(c, {"say": {"text": "Hi", "voice": "v1", "pitch": 2}}) != key
    assert key_of(c, {**body, "say": {**body["say"], "speed": 2}}) is Reason.UNDECLARED_FIELD
    assert key_of(c, {**body, "extra": 1}) is Reason.UNDECLARED_FIELD
    assert key_of(c, {"say": "Hi"}) is Reason.UNDECLARED_FIELD


def test_save_off_always_wins(tmp_path: Path) -> None:
    c = contract(
        '[tts]\nsave_by_default = true\n[[tts.routes]]\npath = "/a"\ncontract = "legacy"\n',
        tmp_path,
    )
    assert isinstance(key_of(c, {"text": "Hi"}), CacheKey)
    for refusal in (False, None, "true", 1):
        assert key_of(c, {"text": "Hi", "save_to_volume": refusal}) is Reason.SAVE_OFF


def test_routes_replace_speak_paths_on_their_path(tmp_path: Path) -> None:
    routes = speak_contracts(
        load_settings(
            env={
                "TTS_PROXY_TTS_ROUTES": '[{"path": "/api/tts/speak", "contract": '
                '"legacy", "scope": "shared"}]'
            }
        )
    )
    assert [(r.path, r.scope) for r in routes] == [("/api/tts/speak", "shared")]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('path = "/v"\ncontract = "openai"', "identity.api_key_secret"),
        ('path = "/v"\ncontract = "custom"', "tts.routes[0].text"),
        ('path = "/v"\ncontract = "custom"\ntext = "t"', "tts.routes[0].voice"),
        ('path = "/v"\ncontract = "legacy"\nkey_fields = ["text"]', "tts.routes[0].key_fields"),
        (
            'path = "/v"\ncontract = "legacy"\nkey_defaults = {speed = 1}',
            "tts.routes[0].key_defaults",
        ),
        ('path = "/_proxy/v"\ncontract = "legacy"', "tts.routes[0].path"),
        ('contract = "legacy"', "tts.routes[0].path"),
        ('path = "/v"\ncontract = "legacy"\nscope = "all"', "tts.routes[0].scope"),
        ('path = "/v"\ncontract = "legacy"\nvoice = "a..b"', "tts.routes[0].voice"),
    ],
)
def test_route_mistakes_name_their_key(toml: str, key: str, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[[tts.routes]]\n{toml}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.key == key


def test_canonical_numbers() -> None:
    assert canonical(1) == canonical(1.0) == 1.0 and isinstance(canonical(1), float)
    assert canonical(True) is True  # a boolean is not the number 1
    assert canonical(2**80 + 1) == 2**80 + 1  # not rounded into another number
    assert canonical({"a": [1, "1"]}) == {"a": [1.0, "1"]}
