"""The caching rules (proxy/policy.py): pure functions and a fake clock, no I/O."""

from __future__ import annotations

import pytest

from proxy.policy import USE_WINDOW_SECONDS, Admission, cacheable_key, entry_matches, storable_head
from proxy.speak import CacheKey, SpeakRequest
from proxy.storage.entry import EntryMeta

SPEAK = SpeakRequest("Hello there", "af_nicole", "replicate", "m-1", "t-1", True)
KEY = CacheKey("a@b.com", "t-1", "m-1", "af_nicole")
AUDIO = {"Content-Type": "audio/mpeg", "Content-Length": "1000", "X-TTS-Provider": "replicate"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def meta(text_sha256: str = "a" * 64, provider: str | None = "replicate") -> EntryMeta:
    return EntryMeta("audio/mpeg", 10, "b" * 64, text_sha256, provider, 0.0)


def test_a_call_with_a_user_ids_and_save_is_cacheable() -> None:
    assert cacheable_key(SPEAK, "a@b.com") == KEY


@pytest.mark.parametrize(
    ("speak", "user"),
    [
        (SPEAK, None),
        (SPEAK, ""),
        (SPEAK._replace(save_to_volume=False), "a@b.com"),
        (SPEAK._replace(message_id=None), "a@b.com"),
        (SPEAK._replace(thread_id=None), "a@b.com"),
        (SPEAK._replace(text="  \n "), "a@b.com"),
        (SPEAK._replace(message_id="../etc"), "a@b.com"),
        (SPEAK, "a/b"),
    ],
)
def test_what_is_not_cacheable(speak: SpeakRequest, user: str | None) -> None:
    assert cacheable_key(speak, user) is None


def test_texts_past_the_limit_bypass_the_cache() -> None:
    assert cacheable_key(SPEAK, "a@b.com", max_text_chars=len(SPEAK.text)) == KEY
    assert cacheable_key(SPEAK, "a@b.com", max_text_chars=len(SPEAK.text) - 1) is None
    assert cacheable_key(SPEAK, "a@b.com", max_text_chars=0) == KEY


def test_a_clean_audio_answer_is_storable() -> None:
    assert storable_head(200, AUDIO, wanted_provider="replicate", max_entry_bytes=1000)
    assert storable_head(200, AUDIO, wanted_provider=None, max_entry_bytes=1000)
    unsized = {k: v for k, v in AUDIO.items() if k != "Content-Length"}
    assert storable_head(200, unsized, wanted_provider=None, max_entry_bytes=1)


@pytest.mark.parametrize(
    ("status", "change", "provider"),
    [
        (500, {}, None),
        (206, {}, None),
        (200, {"Content-Type": "application/json"}, None),
        (200, {"Content-Encoding": "gzip"}, None),
        (200, {"Content-Length": "1001"}, None),
        (200, {"Content-Length": "12x"}, None),
        (200, {"X-TTS-Fallback": "provider"}, None),
        (200, {}, "deepgram"),
        (200, {"X-TTS-Provider": ""}, "replicate"),
    ],
)
def test_what_is_never_stored(status: int, change: dict[str, str], provider: str | None) -> None:
    headers = {**AUDIO, **change}
    assert not storable_head(status, headers, wanted_provider=provider, max_entry_bytes=1000)


def test_an_entry_matches_its_text_and_the_provider_asked_for() -> None:
    assert entry_matches(meta(), "a" * 64, None)
    assert entry_matches(meta(), "a" * 64, "replicate")
    assert not entry_matches(meta(), "c" * 64, None)  # an edited message
    assert not entry_matches(meta(), "a" * 64, "deepgram")
    assert not entry_matches(meta(provider=None), "a" * 64, "replicate")


def test_admission_stores_from_the_nth_use_within_the_window() -> None:
    clock = FakeClock()
    admission = Admission(min_uses=3, clock=clock)
    assert [admission.count_use(KEY, "t") for _ in range(4)] == [False, False, True, True]
    assert not admission.count_use(KEY, "other text")  # counted per text
    clock.now += USE_WINDOW_SECONDS + 1
    assert not admission.count_use(KEY, "t")  # the window has passed: counting starts again


def test_admission_with_one_use_stores_at_once() -> None:
    assert Admission(min_uses=1, clock=FakeClock()).count_use(KEY, "t")
