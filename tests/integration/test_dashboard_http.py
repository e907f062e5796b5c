"""The dashboard over plain HTTP: off without a token, sessions, CSRF, purge, listing, headers."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote

import pytest

from proxy.admin.session import COOKIE_NAME
from proxy.state import INDEX
from tests.conftest import MakeProxyClient
from tests.fakes import FakeLegacyBackend
from tests.support import BOB, SPEAK, TOKEN, settle, speak, speak_body

ADMIN = "/_proxy/admin"
PAGES = ["/", "/entries", "/config", "/entry?user=a&thread=t&message=m&voice=v", "/purge?user=a"]


async def log_in(client: Any, token: str = TOKEN) -> Any:
    async with client.post(
        f"{ADMIN}/login", data={"token": token}, allow_redirects=False
    ) as response:
        return response


async def csrf_of(client: Any, path: str) -> str:
    async with client.get(f"{ADMIN}{path}") as response:
        assert response.status == 200
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', await response.text())
    assert found is not None
    return found.group(1)


async def test_the_dashboard_is_off_without_an_admin_token(
    make_proxy_client: MakeProxyClient, legacy_backend: FakeLegacyBackend
) -> None:
    client = await make_proxy_client()
    for path in [*PAGES, "/login", "/style.css", "/audio/a/t/m/v", ""]:
        async with client.get(f"{ADMIN}{path}", allow_redirects=False) as response:
            assert response.status == 404, path
    assert (await log_in(client)).status == 404
    # Nothing under /_proxy/admin reaches the backend.
    assert not [p for p in legacy_backend.calls if p.startswith("/_proxy")]


async def test_pages_send_a_visitor_to_the_login_and_a_wrong_token_is_refused(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    for path in PAGES:
        async with client.get(f"{ADMIN}{path}", allow_redirects=False) as response:
            assert response.status == 303, path
            assert response.headers["Location"] == f"{ADMIN}/login"
    async with client.get(f"{ADMIN}/audio/alice@example.com/t-1/m-1/af_nicole") as audio:
        assert audio.status == 404

    wrong = await log_in(client, "not-the-token")
    assert wrong.status == 401
    assert COOKIE_NAME not in wrong.cookies
    async with client.get(f"{ADMIN}/", allow_redirects=False) as response:
        assert response.status == 303


async def test_login_sets_a_strict_http_only_cookie_that_never_holds_the_token(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    response = await log_in(client)
    assert response.status == 303 and response.headers["Location"] == f"{ADMIN}/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and f"Path={ADMIN}" in cookie
    assert "Secure" not in cookie  # plain HTTP here
    assert TOKEN not in cookie
    async with client.get(f"{ADMIN}/") as page:
        assert page.status == 200
        assert "Overview" in await page.text()
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["Cache-Control"] == "no-store"

    behind_https = await client.post(
        f"{ADMIN}/login",
        data={"token": TOKEN},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in behind_https.headers["Set-Cookie"]


async def test_logout_needs_the_csrf_token_and_ends_the_session(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    await log_in(client)
    csrf = await csrf_of(client, "/")
    cookie = client.session.cookie_jar.filter_cookies(client.make_url(ADMIN + "/"))[COOKIE_NAME]

    async with client.post(f"{ADMIN}/logout", data={}, allow_redirects=False) as forged:
        assert forged.status == 403
    async with client.post(
        f"{ADMIN}/logout", data={"csrf": csrf}, allow_redirects=False
    ) as response:
        assert response.status == 303
    # The old cookie, replayed, is no session any more.
    async with client.get(
        f"{ADMIN}/", headers={"Cookie": f"{COOKIE_NAME}={cookie.value}"}, allow_redirects=False
    ) as replayed:
        assert replayed.status == 303


async def test_a_purge_needs_the_csrf_token_and_a_same_origin_post(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    assert (await speak(client, SPEAK, speak_body())).cache == "miss"
    await settle(client.app)
    await log_in(client)
    scope = {"user": "alice@example.com", "thread": "t-1"}
    csrf = await csrf_of(client, "/purge?user=alice@example.com&thread=t-1")

    for form, headers in [
        (scope, {}),
        ({**scope, "csrf": "0" * 32}, {}),
        ({**scope, "csrf": csrf}, {"Origin": "http://evil.example"}),
    ]:
        async with client.post(
            f"{ADMIN}/purge", data=form, headers=headers, allow_redirects=False
        ) as refused:
            assert refused.status == 403, (form, headers)
    assert (await speak(client, SPEAK, speak_body())).cache == "hit"

    async with client.post(
        f"{ADMIN}/purge", data={**scope, "csrf": csrf}, allow_redirects=False
    ) as done:
        assert done.status == 303
        location = unquote(done.headers["Location"])
        assert location == f"{ADMIN}/entries?user=alice@example.com&removed=1"
    assert (await speak(client, SPEAK, speak_body())).cache == "miss"


@pytest.mark.parametrize("query", ["thread=t-1", "user=../etc", "user=a&message=m-1", "user=a b"])
async def test_a_bad_purge_scope_is_a_400(make_proxy_client: MakeProxyClient, query: str) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    await log_in(client)
    async with client.get(f"{ADMIN}/purge?{query}") as response:
        assert response.status == 400


async def test_entries_are_listed_newest_first_in_pages_and_filtered(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    for number in range(27):
        await speak(client, SPEAK, speak_body(message_id=f"m-{number:02d}"))
    await speak(client, SPEAK, speak_body(), headers=BOB)
    await settle(client.app)
    await log_in(client)

    async with client.get(f"{ADMIN}/entries") as first:
        page = await first.text()
    assert page.count('class="play"') == 25
    assert 'id="next"' in page and 'id="prev"' not in page
    assert "page 1<" in page and "page=2" in page  # "older" leads to page 2, as numbered
    async with client.get(f"{ADMIN}/entries?page=2") as second:
        page = await second.text()
    assert page.count('class="play"') == 3 and 'id="prev"' in page
    assert "page 2<" in page and "page=1" in page
    async with client.get(f"{ADMIN}/entries?user=bob@example.com") as bob:
        page = await bob.text()
    assert page.count('class="play"') == 1 and "Purge every entry of bob@example.com" in page
    assert ">replicate<" in page  # the provider, from the entry's sidecar


async def test_the_admin_audio_url_serves_ranges_and_etags(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    spoken = await speak(client, SPEAK, speak_body())
    await log_in(client)
    url = f"{ADMIN}/audio/alice@example.com/t-1/m-1/af_nicole"
    async with client.get(url, headers={"Range": "bytes=10-19"}) as part:
        assert part.status == 206
        assert await part.read() == spoken.body[10:20]
        etag = part.headers["ETag"]
    async with client.get(url, headers={"If-None-Match": etag}) as unchanged:
        assert unchanged.status == 304
    async with client.get(f"{ADMIN}/audio/alice@example.com/t-1/m-9/af_nicole") as missing:
        assert missing.status == 404


async def test_the_configuration_page_redacts_secrets(
    make_proxy_client: MakeProxyClient, postgres_dsn: str
) -> None:
    dsn = postgres_dsn.replace("postgres@", "postgres:pg-PASSWORD@")
    client = await make_proxy_client(**{"admin.token": TOKEN, "index.dsn": dsn})
    await log_in(client)
    async with client.get(f"{ADMIN}/config") as response:
        page = await response.text()
    assert 'data-key="admin.token">***<' in page
    assert 'data-key="index.dsn">***<' in page
    assert TOKEN not in page and "pg-PASSWORD" not in page
    assert 'data-key="cache.memory.max_bytes"' in page


async def test_entries_come_from_the_index_with_their_hits(
    make_proxy_client: MakeProxyClient, postgres_dsn: str
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN, "index.dsn": postgres_dsn})
    await speak(client, SPEAK, speak_body())
    await settle(client.app)
    for _ in range(3):
        assert (await speak(client, SPEAK, speak_body())).cache == "hit"
    await log_in(client)
    page = ""
    for _ in range(40):  # hits reach the index with its next flush (every second)
        await client.app[INDEX].flush()
        async with client.get(f"{ADMIN}/entries") as response:
            page = await response.text()
        if 'data-label="hits">3<' in page:
            break
        await asyncio.sleep(0.1)
    assert "From the index" in page
    assert 'data-label="hits">3<' in page


async def test_without_a_volume_entries_are_listed_from_memory(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN, "cache.volume.kind": "none"})
    for message in ("m-2", "m-1"):
        assert (await speak(client, SPEAK, speak_body(message_id=message))).cache == "miss"
    await log_in(client)
    async with client.get(f"{ADMIN}/entries") as response:
        page = await response.text()
    assert "From the memory" in page
    assert re.findall(r'data-label="message">(m-\d)<', page) == ["m-1", "m-2"]
    assert page.count(">64.0 KiB<") == 2 and page.count(">replicate<") == 2


async def test_behind_a_gateway_the_public_origin_named_by_x_forwarded_host_is_same_origin(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    await log_in(client)
    csrf = await csrf_of(client, "/")
    public = {"Origin": "https://tts.example.com"}
    async with client.post(
        f"{ADMIN}/logout", data={"csrf": csrf}, headers=public, allow_redirects=False
    ) as refused:
        assert refused.status == 403
    async with client.post(
        f"{ADMIN}/logout",
        data={"csrf": csrf},
        headers={**public, "X-Forwarded-Host": "tts.example.com"},
        allow_redirects=False,
    ) as accepted:
        assert accepted.status == 303


async def test_stats_metrics_and_dashboard_agree_on_the_volume_right_after_writes(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    for number in range(4):
        await speak(client, SPEAK, speak_body(message_id=f"m-{number}"))
    await settle(client.app)  # stored; the janitor has not walked the Volume yet

    async with client.get(
        "/_proxy/admin/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as stats:
        volume = (await stats.json())["tiers"]["volume"]
    async with client.get("/_proxy/metrics") as scraped:
        metrics = await scraped.text()
    await log_in(client)
    async with client.get(f"{ADMIN}/") as page:
        shown = re.search(r'id="volume-entries">(\d+)<', await page.text())

    assert volume["entries"] == 4 and volume["source"] == "scan"
    assert 'tts_proxy_cache_entries{tier="volume"} 4.0' in metrics
    assert shown is not None and shown.group(1) == "4"
