"""The admin token cannot be guessed: a long token, a throttle per client, an allow-list."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.admin.guard import MAX_FAILURES
from proxy.config import ConfigError
from tests.conftest import MakeProxyClient, settings_for
from tests.support import TOKEN

API = "/_proxy/admin/api/stats"


def test_a_short_admin_token_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_for(tmp_path, "http://127.0.0.1:9", **{"admin.token": "a"})
    assert refused.value.key == "admin.token"
    assert "32" in str(refused.value)
    settings_for(tmp_path, "http://127.0.0.1:9", **{"admin.token": "x" * 32})


async def test_wrong_bearer_tokens_are_throttled_per_client(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    wrong = {"Authorization": "Bearer " + "g" * 40}
    answers = [(await client.get(API, headers=wrong)).status for _ in range(MAX_FAILURES + 3)]

    assert answers[:MAX_FAILURES] == [401] * MAX_FAILURES
    assert answers[MAX_FAILURES:] == [429, 429, 429]
    throttled = await client.get(API, headers={"Authorization": f"Bearer {TOKEN}"})
    assert throttled.status == 429  # even the right token waits: guessing cannot probe past it
    assert int(throttled.headers["Retry-After"]) >= 1
    assert "detail" in await throttled.json()


async def test_behind_a_gateway_each_caller_has_its_own_budget(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    attacker = {"Authorization": "Bearer wrong-token", "X-Real-Ip": "203.0.113.9"}
    for _ in range(MAX_FAILURES + 1):
        await client.get(API, headers=attacker)
    assert (await client.get(API, headers=attacker)).status == 429

    operator = {"Authorization": f"Bearer {TOKEN}", "X-Real-Ip": "198.51.100.7"}
    assert (await client.get(API, headers=operator)).status == 200


async def test_wrong_logins_on_the_dashboard_are_throttled(
    make_proxy_client: MakeProxyClient,
) -> None:
    client = await make_proxy_client(**{"admin.token": TOKEN})
    statuses = []
    for _ in range(MAX_FAILURES + 1):
        response = await client.post("/_proxy/admin/login", data={"token": "nope"})
        statuses.append(response.status)
    assert statuses == [401] * MAX_FAILURES + [429]


async def test_outside_the_allow_list_the_admin_does_not_exist(
    make_proxy_client: MakeProxyClient,
) -> None:
    outside = await make_proxy_client(
        **{"admin.token": TOKEN, "admin.allowed_networks": ["10.0.0.0/8"]}
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert (await outside.get(API, headers=bearer)).status == 404
    assert (await outside.get("/_proxy/admin/login")).status == 404

    inside = await make_proxy_client(
        **{"admin.token": TOKEN, "admin.allowed_networks": ["127.0.0.0/8"]}
    )
    assert (await inside.get(API, headers=bearer)).status == 200
    assert (await inside.get("/_proxy/admin/login")).status == 200
