"""The demo backend's offline audio: deterministic, distinct per text and voice, valid WAV."""

from __future__ import annotations

import io
import wave

import pytest

from proxy.demo import MAX_SECONDS, SAMPLE_RATE, WORD_SECONDS, espeak_voice, synthesize


def _params(audio: bytes) -> tuple[int, int, int, int]:
    """Channels, sample width, rate and frame count, after checking the frames are all there."""
    with wave.open(io.BytesIO(audio), "rb") as reader:
        channels, width, rate, count = reader.getparams()[:4]
        frames = reader.readframes(count)
    assert len(frames) == count * width * channels
    return channels, width, rate, count


def test_same_text_and_voice_give_the_same_bytes() -> None:
    first = synthesize("Hello there, general Kenobi.", "af_nicole")
    second = synthesize("Hello there, general Kenobi.", "af_nicole")
    assert first == second
    assert first[1] == "audio/wav"


def test_different_texts_give_different_bytes() -> None:
    assert synthesize("hello world", "af_nicole") != synthesize("hello there", "af_nicole")


def test_different_voices_give_different_bytes() -> None:
    assert synthesize("hello world", "af_nicole") != synthesize("hello world", "bm_george")


def test_audio_is_a_16_bit_mono_wav_of_a_quarter_second_per_word() -> None:
    audio, _ = synthesize("one two three four", "am_adam")
    channels, width, rate, count = _params(audio)
    assert (channels, width, rate) == (1, 2, SAMPLE_RATE)
    assert count / SAMPLE_RATE == pytest.approx(4 * WORD_SECONDS, abs=0.01)


def test_audio_is_not_silent() -> None:
    audio, _ = synthesize("audible", "af_nicole")
    with wave.open(io.BytesIO(audio), "rb") as reader:
        frames = reader.readframes(reader.getnframes())
    assert max(frames) > 0


def test_long_text_is_capped_at_thirty_seconds() -> None:
    audio, _ = synthesize("word " * 1000, "af_nicole")
    duration = _params(audio)[3] / SAMPLE_RATE
    assert MAX_SECONDS - 0.1 <= duration <= MAX_SECONDS


def test_empty_text_still_gives_a_valid_wav() -> None:
    assert _params(synthesize("", "af_nicole")[0])[3] > 0


@pytest.mark.parametrize(
    ("voice", "expected"),
    [
        ("af_nicole", "en-us+f3"),
        ("am_adam", "en-us+m3"),
        ("bf_emma", "en-gb+f3"),
        ("bm_george", "en-gb+m3"),
        ("aura-2-thalia-en", "en-us"),
        ("", "en-us"),
    ],
)
def test_espeak_voice_follows_the_voice_prefix(voice: str, expected: str) -> None:
    assert espeak_voice(voice) == expected
