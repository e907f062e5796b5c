"""What a cached answer may carry to another client: no one's cookie, CORS for its own origin,
and `Cache-Control: private` so no shared cache hands one user's audio to another."""

from __future__ import annotations

import asyncio

from tests.conftest import ProxyClient
from tests.fakes.legacy_backend import FakeLegacyBackend
from tests.support import ALICE, SPEAK, speak_body

EVIL = "https://evil.example"
OTHER = "https://other.example"


async def test_a_joined_client_never_gets_the_first_clients_cookie(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.headers_delay = 0.3
    legacy_backend.speak.extra_headers = {"Set-Cookie": "session=leaders-secret"}
    body = speak_body(message_id="m-cookie")

    async def call() -> tuple[str, str | None, str | None, bytes]:
        async with proxy_client.post(SPEAK, json=body, headers=ALICE) as response:
            data = await response.read()
            return (
                response.headers["Cache-Status"],
                response.headers.get("Set-Cookie"),
                response.headers.get("Content-Type"),
                data,
            )

    leader = asyncio.create_task(call())
    await asyncio.sleep(0.1)
    joined = await call()
    first = await leader

    assert legacy_backend.calls[SPEAK] == 1
    assert "collapsed" in joined[0] and "collapsed" not in first[0]
    assert first[1] == "session=leaders-secret"  # the first client's own exchange
    assert joined[1] is None
    assert joined[2] == "audio/mpeg" and joined[3] == first[3]
    hit = await proxy_client.post(SPEAK, json=body, headers=ALICE)
    assert hit.headers["X-TTS-Cache"] == "hit" and "Set-Cookie" not in hit.headers


async def test_cors_for_one_origin_is_replayed_only_to_that_origin(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.extra_headers = {
        "Access-Control-Allow-Origin": EVIL,
        "Access-Control-Allow-Credentials": "true",
    }
    body = speak_body(message_id="m-cors")
    first = await proxy_client.post(SPEAK, json=body, headers={**ALICE, "Origin": EVIL})
    await first.read()
    assert first.headers["X-TTS-Cache"] == "miss"

    other = await proxy_client.post(SPEAK, json=body, headers={**ALICE, "Origin": OTHER})
    await other.read()
    assert other.headers["X-TTS-Cache"] == "hit"
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Credentials" not in other.headers
    assert "Origin" in other.headers["Vary"]

    same = await proxy_client.post(SPEAK, json=body, headers={**ALICE, "Origin": EVIL})
    await same.read()
    assert same.headers["Access-Control-Allow-Origin"] == EVIL
    assert "Origin" in same.headers["Vary"]

    audio = await proxy_client.get(
        first.headers["Content-Location"], headers={**ALICE, "Origin": OTHER}
    )
    assert audio.status == 200
    assert "Access-Control-Allow-Origin" not in audio.headers


async def test_a_wildcard_without_credentials_is_replayed_to_anyone(
    proxy_client: ProxyClient,
) -> None:
    body = speak_body(message_id="m-star")
    await (await proxy_client.post(SPEAK, json=body, headers=ALICE)).read()
    hit = await proxy_client.post(SPEAK, json=body, headers={**ALICE, "Origin": OTHER})
    assert hit.headers["Access-Control-Allow-Origin"] == "*"


async def test_cacheable_speak_answers_are_private(
    proxy_client: ProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    legacy_backend.speak.extra_headers = {"Cache-Control": "public, max-age=600"}
    body = speak_body(message_id="m-private")
    miss = await proxy_client.post(SPEAK, json=body, headers=ALICE)
    await miss.read()
    hit = await proxy_client.post(SPEAK, json=body, headers=ALICE)
    await hit.read()
    audio = await proxy_client.get(miss.headers["Content-Location"], headers=ALICE)

    for answer in (miss, hit, audio):
        directives = [d.strip() for d in answer.headers["Cache-Control"].split(",")]
        assert "private" in directives and "public" not in directives
    assert "max-age=600" in hit.headers["Cache-Control"]
