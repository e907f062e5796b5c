"""Fakes the tests talk to over real sockets: the legacy backend."""

from tests.fakes.legacy_backend import FakeLegacyBackend, SpeakBehaviour

__all__ = ["FakeLegacyBackend", "SpeakBehaviour"]
