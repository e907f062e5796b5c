"""The cache's own key segments ("_text", "_shared", "_key-...") cannot be named from outside.

A content entry lives beside a user's messages, an API key's entries under a user of their own,
the shared scope under a user of its own: a gateway, a body or a URL that names those segments
reaches nothing it does not own.
"""

from __future__ import annotations

from proxy.api_keys import key_user
from tests.conftest import MakeProxyClient
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.support import SPEAK

SECRET = "a-per-deployment-secret-of-32-characters"
BODY = {"text": "Hello there", "voice": "af_nicole", "save_to_volume": True}


async def test_a_gateway_cannot_name_the_caches_own_users(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client(
        **{
            "identity.api_key_secret": SECRET,
            # The speak path known by API key; the gateway's identity still rules the audio URL.
            "tts.routes": [{"path": SPEAK, "contract": "legacy", "identity": "api-key"}],
        }
    )
    async with client.post(SPEAK, json=BODY, headers={"Authorization": "Bearer sk-1"}) as r:
        assert r.headers["X-TTS-Cache"] == "miss"
        location = r.headers["Content-Location"]
        await r.read()
    async with client.get(location, headers={"Authorization": "Bearer sk-1"}) as r:
        assert r.status == 200
    # The very user that key stands for, named by a (trusted) gateway's header: not believed.
    for named in (key_user(SECRET.encode(), "sk-1"), "_shared", "_text"):
        async with client.get(location, headers={"X-Forwarded-Email": named}) as r:
            assert r.status == 404, named
    calls = legacy_backend.calls[SPEAK]
    async with client.post(SPEAK, json=BODY, headers={"Authorization": "Bearer sk-2"}) as r:
        assert r.headers["X-TTS-Cache"] == "miss"  # another key: its own entry
        await r.read()
    assert legacy_backend.calls[SPEAK] == calls + 1


async def test_a_gateway_named_user_with_a_reserved_segment_is_disabled(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client()
    for named in ("_shared", "_key-" + "0" * 32, "_text"):
        async with client.post(SPEAK, json=BODY, headers={"X-Forwarded-Email": named}) as r:
            await r.read()
            assert r.headers["X-TTS-Cache"] == "disabled"
            assert r.headers["Cache-Status"].endswith("detail=invalid-id")


async def test_a_body_cannot_address_a_content_entry_by_ids(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client()
    alice = {"X-Forwarded-Email": "alice@example.com"}
    async with client.post(SPEAK, json=BODY, headers=alice) as r:
        location = r.headers["Content-Location"]
        await r.read()
    _, _, _, thread, message, variant = location.split("/")
    forged = {**BODY, "text": "Other words", "thread_id": thread, "message_id": message}
    async with client.post(SPEAK, json={**forged, "voice": variant}, headers=alice) as r:
        await r.read()
        assert r.headers["Cache-Status"].endswith("detail=invalid-id")
    async with client.post(SPEAK, json=BODY, headers=alice) as r:
        assert r.headers["X-TTS-Cache"] == "hit"  # the entry is intact
    for hostile in ("_shared/..%2F..%2Fx/y", "_text/../../../etc/passwd", "_other/a/b"):
        async with client.get(f"/_proxy/audio/{hostile}", headers=alice) as r:
            assert r.status == 404, hostile
