"""The proxy's own space: /_proxy/* never reaches the backend, nor does the admin cookie."""

from __future__ import annotations

import pytest

from tests.conftest import MakeProxyClient, ProxyClient
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.integration.test_passthrough import echoed_headers
from tests.support import SPEAK, TOKEN

ADMIN_COOKIE = "tts_proxy_admin"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/_proxy/admin/api/entries/?all=true"),
        ("GET", "/_proxy/nothing"),
        ("POST", "/_proxy/admin/api/purge"),
        ("GET", "/_proxy/"),
    ],
)
async def test_unrouted_proxy_paths_are_a_404_from_the_proxy(
    make_proxy_client: MakeProxyClient,
    legacy_backend: FakeLegacyBackend,
    method: str,
    path: str,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    response = await client.request(
        method,
        path,
        headers={"Authorization": f"Bearer {TOKEN}", "Cookie": f"{ADMIN_COOKIE}=signed"},
    )

    assert response.status == 404
    assert "detail" in await response.json()
    assert sum(legacy_backend.calls.values()) == 0


async def test_the_admin_cookie_is_never_forwarded(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    cookies = f"session=app; {ADMIN_COOKIE}=signed-admin-session; theme=dark"
    response = await proxy_client.get("/echo", headers={"Cookie": cookies})

    seen = echoed_headers(await response.json())
    assert seen["Cookie"] == "session=app; theme=dark"

    only_admin = await proxy_client.get("/echo", headers={"Cookie": f"{ADMIN_COOKIE}=x"})
    assert "Cookie" not in echoed_headers(await only_admin.json())

    speak = await proxy_client.post(
        SPEAK,
        json={"text": "hi", "voice": "af_nicole"},
        headers={"Cookie": f"{ADMIN_COOKIE}=x; a=b", "X-Forwarded-Email": "alice@example.com"},
    )
    await speak.read()
    assert legacy_backend.speak_headers[-1]["Cookie"] == "a=b"


async def test_deeply_nested_json_is_forwarded_untouched(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    response = await proxy_client.post(
        SPEAK,
        data=nested,
        headers={"Content-Type": "application/json", "X-Forwarded-Email": "alice@example.com"},
    )

    assert response.status == 422  # the backend's own answer to a body that is not an object
    assert response.headers["X-TTS-Cache"] == "disabled"
    assert legacy_backend.calls[SPEAK] == 1
