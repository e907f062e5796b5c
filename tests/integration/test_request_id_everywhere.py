"""Every response names its request id: hits, misses, pass-through, errors, the operator's pages.

The id is stamped by each route (proxy.request_context.with_request_id), not by a signal, so a
route registered without it, or a streamed response prepared without stamping, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from proxy.request_context import with_request_id
from tests.conftest import MakeProxyClient, ProxyClient, free_port
from tests.support import ALICE, SPEAK, TOKEN, speak_body

NEW_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


def assert_new_id(headers: object) -> str:
    value = getattr(headers, "get")("X-Request-Id")  # noqa: B009 - CIMultiDictProxy or dict
    assert value is not None, "no X-Request-Id"
    assert NEW_ID.fullmatch(value), value
    return str(value)


@pytest.fixture
async def client(make_proxy_client: MakeProxyClient) -> ProxyClient:
    return await make_proxy_client(**{"admin.token": TOKEN})


async def test_speak_outcomes_all_carry_an_id(client: ProxyClient) -> None:
    ids = []
    for expected in ("miss", "hit"):
        async with client.post(SPEAK, json=speak_body(), headers=ALICE) as response:
            assert response.status == 200
            assert response.headers["X-TTS-Cache"] == expected
            await response.read()
            ids.append(assert_new_id(response.headers))
    async with client.post(SPEAK, json={"text": "no ids"}, headers=ALICE) as response:
        assert response.headers["X-TTS-Cache"] == "disabled"
        ids.append(assert_new_id(response.headers))
    async with client.post(
        SPEAK, data=b"{not json", headers={**ALICE, "Content-Type": "application/json"}
    ) as response:
        ids.append(assert_new_id(response.headers))
    too_big = b'{"text": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    async with client.post(SPEAK, data=too_big, headers=ALICE) as response:
        assert response.status == 413
        ids.append(assert_new_id(response.headers))
    assert len(set(ids)) == len(ids)


async def test_a_sane_client_id_is_echoed_on_hits_and_misses(client: ProxyClient) -> None:
    for n in range(2):
        headers = {**ALICE, "X-Request-Id": f"client-{n}"}
        async with client.post(SPEAK, json=speak_body(), headers=headers) as response:
            await response.read()
            assert response.headers["X-Request-Id"] == f"client-{n}"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/_proxy/health", 200),
        ("HEAD", "/_proxy/health", 200),
        ("GET", "/_proxy/ready", 200),
        ("GET", "/_proxy/metrics", 200),
        ("GET", "/_proxy/audio/t-1/m-1/af_nicole", 404),
        ("GET", "/_proxy/admin/api/stats", 401),
        ("GET", "/_proxy/admin/login", 200),
        ("GET", "/_proxy/admin/", 303),
        ("GET", "/echo/anything", 200),
        ("GET", "/status/500", 500),
        ("GET", "/sse", 200),
    ],
)
async def test_other_routes_carry_an_id(
    client: ProxyClient, method: str, path: str, status: int
) -> None:
    async with client.request(method, path, allow_redirects=False) as response:
        assert response.status == status
        await response.read()
        assert_new_id(response.headers)


async def test_a_websocket_upgrade_carries_an_id(client: ProxyClient) -> None:
    async with client.ws_connect("/ws") as ws:
        assert_new_id(ws._response.headers)
        await ws.send_str("ping")
        message = await ws.receive()
        assert message.type == WSMsgType.TEXT


async def test_a_dead_upstream_gives_a_502_with_an_id(
    make_proxy_client: MakeProxyClient,
) -> None:
    dead = await make_proxy_client(**{"upstream.url": f"http://127.0.0.1:{free_port()}"})
    async with dead.get("/anything") as response:
        assert response.status == 502
        assert_new_id(response.headers)
    async with dead.post(SPEAK, json=speak_body(), headers=ALICE) as response:
        assert response.status == 502
        assert_new_id(response.headers)


async def test_an_unexpected_error_is_a_json_500_with_the_id_in_the_log(
    aiohttp_client: object, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug")

    async def refused(request: web.Request) -> web.StreamResponse:
        raise web.HTTPForbidden(text="no")

    app = web.Application()
    app.router.add_get("/broken", with_request_id(broken))
    app.router.add_get("/refused", with_request_id(refused))
    test_client: TestClient[web.Request, web.Application] = await aiohttp_client(app)  # type: ignore[operator]
    async with test_client.get("/broken") as response:
        assert response.status == 500
        assert await response.json() == {"detail": "internal error"}
        rid = assert_new_id(response.headers)
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)
    async with test_client.get("/refused", headers={"X-Request-Id": "mine"}) as response:
        assert response.status == 403
        assert response.headers["X-Request-Id"] == "mine"
