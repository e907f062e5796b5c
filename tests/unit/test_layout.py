"""The Volume layout shared by every Volume: object names by content type."""

from __future__ import annotations

from proxy.storage.layout import extension_for


def test_extension_for_content_types() -> None:
    assert extension_for("audio/mpeg") == "mp3"
    assert extension_for("Audio/WAV; charset=binary") == "wav"
    assert extension_for("audio/x-wav") == "wav"
    assert extension_for("audio/wave") == "wav"
    assert extension_for("audio/ogg") == "ogg"
    assert extension_for("audio/opus") == "opus"
    assert extension_for("audio/flac") == "flac"
    assert extension_for("audio/aac") == "aac"
    assert extension_for("audio/webm") == "webm"
    assert extension_for("application/octet-stream") == "bin"
