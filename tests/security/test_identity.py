"""Identity that cannot be bent: repeated headers, Connection tricks, the gateway's headers."""

from __future__ import annotations

import logging

import pytest
from multidict import CIMultiDict

from tests.conftest import MakeProxyClient, ProxyClient
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.integration.test_passthrough import echoed_headers
from tests.support import SPEAK, speak_body

ALICE = "alice@example.com"
MALLORY = "mallory@example.com"


async def test_a_repeated_user_header_is_no_identity_and_never_forwarded(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    body = speak_body()
    first = await proxy_client.post(SPEAK, json=body, headers={"X-Forwarded-Email": ALICE})
    assert first.headers["X-TTS-Cache"] == "miss"
    await first.read()

    # A gateway that appends its header after the client's own: two copies, first one Alice's.
    headers = CIMultiDict([("X-Forwarded-Email", ALICE), ("X-Forwarded-Email", MALLORY)])
    headers.add("X-Forwarded-Access-Token", "tok")
    again = await proxy_client.post(SPEAK, json=body, headers=headers)
    await again.read()

    assert again.status == 200
    assert again.headers["X-TTS-Cache"] == "disabled"  # not Alice's hit
    assert legacy_backend.calls[SPEAK] == 2
    seen = legacy_backend.speak_headers[-1]
    assert "X-Forwarded-Email" not in seen
    assert "X-Forwarded-Access-Token" not in seen


async def test_a_user_header_holding_a_list_is_no_identity(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    listed = {"X-Forwarded-Email": f"{ALICE}, {MALLORY}"}
    response = await proxy_client.post(SPEAK, json=speak_body(), headers=listed)
    await response.read()

    assert response.headers["X-TTS-Cache"] == "disabled"
    assert "X-Forwarded-Email" not in legacy_backend.speak_headers[-1]


async def test_a_repeated_token_header_is_no_identity(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    headers = CIMultiDict([("X-Forwarded-Email", ALICE)])
    headers.add("X-Forwarded-Access-Token", "alice-token")
    headers.add("X-Forwarded-Access-Token", "mallory-token")
    response = await proxy_client.post(SPEAK, json=speak_body(), headers=headers)
    await response.read()

    assert response.headers["X-TTS-Cache"] == "disabled"
    seen = legacy_backend.speak_headers[-1]
    assert "X-Forwarded-Access-Token" not in seen
    assert "X-Forwarded-Email" not in seen


async def test_connection_naming_identity_headers_is_refused(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    for named in ("X-Forwarded-Email", "X-Forwarded-Access-Token", "X-Forwarded-For", "Forwarded"):
        headers = {"X-Forwarded-Email": ALICE, "Connection": f"close, {named}"}
        response = await proxy_client.post(SPEAK, json=speak_body(), headers=headers)
        assert response.status == 400, named
        assert "detail" in await response.json()
        passthrough = await proxy_client.get("/echo", headers=headers)
        assert passthrough.status == 400, named
    assert legacy_backend.calls[SPEAK] == 0
    assert legacy_backend.calls["/echo"] == 0

    # Connection naming ordinary headers still works as RFC 9110 7.6.1 says.
    fine = await proxy_client.get("/echo", headers={"Connection": "X-Hop", "X-Hop": "1"})
    assert fine.status == 200
    assert "X-Hop" not in echoed_headers(await fine.json())


async def test_the_gateway_header_family_is_dropped_from_untrusted_peers(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"identity.trusted_proxies": ["10.0.0.0/8"]})
    family = {
        "X-Forwarded-User": "mallory",
        "X-Forwarded-Preferred-Username": "mallory",
        "X-Real-Ip": "10.1.2.3",
        "Forwarded": "for=10.1.2.3;proto=https",
        "X-Kept": "yes",
    }
    response = await client.get("/echo", headers=family)

    seen = echoed_headers(await response.json())
    for name in ("X-Forwarded-User", "X-Forwarded-Preferred-Username", "X-Real-Ip", "Forwarded"):
        assert name not in seen, name
    assert seen["X-Kept"] == "yes"


async def test_the_family_list_is_configurable(make_proxy_client: MakeProxyClient) -> None:
    client = await make_proxy_client(
        **{"identity.trusted_proxies": ["10.0.0.0/8"], "identity.untrusted_drop": ["X-Tenant"]}
    )
    response = await client.get("/echo", headers={"X-Tenant": "evil", "X-Real-Ip": "1.2.3.4"})

    seen = echoed_headers(await response.json())
    assert "X-Tenant" not in seen
    assert seen["X-Real-Ip"] == "1.2.3.4"


async def test_the_family_from_a_trusted_gateway_reaches_the_backend(
    proxy_client: ProxyClient,
) -> None:
    response = await proxy_client.get("/echo", headers={"X-Forwarded-User": "alice-id"})

    assert echoed_headers(await response.json())["X-Forwarded-User"] == "alice-id"


async def test_identity_from_an_untrusted_peer_is_named_in_one_warning(
    make_proxy_client: MakeProxyClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy_client(**{"identity.trusted_proxies": ["10.0.0.0/8"]})
    caplog.set_level(logging.WARNING, logger="proxy.identity")
    for _ in range(3):
        await (await client.get("/echo", headers={"X-Forwarded-Email": ALICE})).read()
        await (
            await client.post(SPEAK, json=speak_body(), headers={"X-Forwarded-Email": ALICE})
        ).read()
    await (await client.get("/echo")).read()

    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.identity"]
    assert len(warnings) == 1  # once per address and interval, not per request
    assert "127.0.0.1" in warnings[0] and "identity.trusted_proxies" in warnings[0]
    assert ALICE not in warnings[0]
