"""Settings that load but quietly defeat identity are named at start."""

from __future__ import annotations

import pytest

from proxy.config import IdentitySettings
from proxy.identity import loopback_trust_warning

LOOPBACK_ONLY = IdentitySettings()  # the default: 127.0.0.0/8 and ::1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "proxy.internal"])
def test_listening_beyond_loopback_while_trusting_loopback_alone_is_named(host: str) -> None:
    warning = loopback_trust_warning(host, LOOPBACK_ONLY)

    assert warning is not None
    assert "identity.trusted_proxies" in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_listener_trusting_loopback_is_fine(host: str) -> None:
    assert loopback_trust_warning(host, LOOPBACK_ONLY) is None


def test_a_trusted_gateway_range_or_no_identity_is_fine() -> None:
    gateway = IdentitySettings(trusted_proxies=["127.0.0.0/8", "172.16.0.0/12"])
    assert loopback_trust_warning("0.0.0.0", gateway) is None
    assert loopback_trust_warning("0.0.0.0", IdentitySettings(mode="none")) is None


def test_identity_by_api_key_believes_no_gateway_so_nothing_to_warn_about() -> None:
    assert loopback_trust_warning("0.0.0.0", IdentitySettings(mode="api-key")) is None
