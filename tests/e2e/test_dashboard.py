"""The dashboard in real headless Chromium: login, overview numbers, playing, purging, CSRF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.demo import create_demo_app
from tests.conftest import settings_for
from tests.e2e.live import LiveServer, LiveStack, click
from tests.fakes import FakeLegacyBackend
from tests.support import ALICE, TOKEN, speak_body

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ADMIN = "/_proxy/admin"

# chromedriver now and then acts on a node of a page being replaced ("Node with given id does not
# belong to the document"): a browser test that fails that way gets two more tries, and a real
# failure fails all three.
pytestmark = pytest.mark.flaky(reruns=2)


@pytest.fixture
def fake_backend(stack: LiveStack) -> Iterator[FakeLegacyBackend]:
    """The fake legacy backend, on the servers' loop."""
    backend = FakeLegacyBackend()
    stack.live.run(backend.start())
    try:
        yield backend
    finally:
        stack.live.run(backend.stop())


@pytest.fixture
def proxy(stack: LiveStack, fake_backend: FakeLegacyBackend, tmp_path: Path) -> LiveServer:
    """The proxy, with the dashboard on, in front of the fake backend."""
    return stack.proxy(settings_for(tmp_path, fake_backend.url, **{"admin.token": TOKEN}))


@pytest.fixture
def chrome(browser: Any) -> Iterator[Any]:
    """The module's browser, logged out and at desktop width."""
    browser.set_window_size(1280, 900)
    yield browser
    browser.delete_all_cookies()


def log_in(chrome: Any, proxy: LiveServer, token: str = TOKEN) -> None:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    for attempt in range(3):
        chrome.get(f"{proxy.url}{ADMIN}/login")
        try:
            chrome.find_element(By.ID, "token").send_keys(token)
            click(chrome, chrome.find_element(By.ID, "login"))
            return
        except (StaleElementReferenceException, WebDriverException) as exc:
            # chromedriver sometimes acts on a node of the page being replaced: start again.
            transient = isinstance(exc, StaleElementReferenceException) or (
                "does not belong to the document" in str(exc)
            )
            if attempt == 2 or not transient:
                raise


def text_of(chrome: Any, element_id: str) -> str:
    return str(chrome.find_element(By.ID, element_id).text)


def test_a_wrong_token_is_refused_and_the_right_one_opens_the_overview(
    chrome: Any, proxy: LiveServer
) -> None:
    chrome.get(f"{proxy.url}{ADMIN}/")
    assert chrome.current_url == f"{proxy.url}{ADMIN}/login"

    log_in(chrome, proxy, "not-the-token")
    assert "not the admin token" in text_of(chrome, "login-error")
    assert chrome.get_cookies() == []

    log_in(chrome, proxy)
    assert chrome.current_url == f"{proxy.url}{ADMIN}/"
    assert chrome.find_element(By.TAG_NAME, "h1").text == "Overview"
    (cookie,) = chrome.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    # Not readable from scripts.
    assert "tts_proxy_admin" not in chrome.execute_script("return document.cookie")

    click(chrome, chrome.find_element(By.ID, "logout"))
    assert chrome.current_url == f"{proxy.url}{ADMIN}/login"
    chrome.get(f"{proxy.url}{ADMIN}/config")
    assert chrome.current_url == f"{proxy.url}{ADMIN}/login"


def test_the_overview_shows_the_numbers_of_a_known_sequence(
    chrome: Any, stack: LiveStack, proxy: LiveServer, fake_backend: FakeLegacyBackend
) -> None:
    assert stack.speak(proxy, speak_body()).cache == "miss"
    for _ in range(3):
        assert stack.speak(proxy, speak_body()).tier == "memory"
    assert stack.speak(proxy, speak_body(message_id="m-2")).cache == "miss"
    stack.drain(proxy)
    stack.clear_memory(proxy)
    assert stack.speak(proxy, speak_body()).tier == "volume"
    assert stack.speak(proxy, speak_body(), headers={}).cache == "disabled"

    log_in(chrome, proxy)
    expected = {
        "memory-hits": "3",
        "volume-hits": "1",
        "misses": "2",
        "coalesced": "0",
        "disabled": "1",
        "upstream-calls": "2",
        "stored": "2",
        "saved": "4",
        "hit-ratio": "66.7 %",
        "hour-hit-ratio": "66.7 %",
        "memory-entries": "1",  # m-1, back from the Volume
        "volume-entries": "2",
        "errors-upstream": "0",
        "errors-volume": "0",
        "errors-volume_corrupt": "0",
        "breaker": "local folder, breaker closed",
        "index-state": "not configured",
    }
    shown = {element_id: text_of(chrome, element_id) for element_id in expected}
    assert shown == expected
    assert text_of(chrome, "latency-p50").endswith(" ms")
    assert text_of(chrome, "memory-bytes").endswith("KiB")
    # This minute's bar: memory, Volume and miss segments, server-rendered SVG.
    bars = chrome.find_elements(By.CSS_SELECTOR, "svg.chart g.bar")
    assert len(bars) == 1
    kinds = {rect.get_attribute("class") for rect in bars[0].find_elements(By.TAG_NAME, "rect")}
    assert kinds == {"memory", "volume", "miss"}
    # The y axis is labelled, inside the drawing and not clipped.
    ticks = chrome.find_elements(By.CSS_SELECTOR, "svg.chart text.y-tick")
    assert [tick.text for tick in ticks] == ["100 %", "50 %", "0 %"]
    assert all(tick.is_displayed() and tick.rect["width"] > 0 for tick in ticks)
    # The latency count says it counts every upstream call, pass-through included.
    label = chrome.find_element(By.XPATH, "//td[@id='latency-count']/preceding-sibling::th")
    assert "pass-through" in label.text


def test_an_entry_plays_in_the_audio_element(chrome: Any, stack: LiveStack, tmp_path: Path) -> None:
    demo = stack.add(create_demo_app(use_espeak=False))
    proxy = stack.proxy(settings_for(tmp_path, demo.url, **{"admin.token": TOKEN}))
    body = speak_body(text="Hello from the cache, played in a browser")
    assert stack.speak(proxy, body).cache == "miss"
    stack.drain(proxy)

    log_in(chrome, proxy)
    chrome.get(f"{proxy.url}{ADMIN}/entries")
    click(chrome, chrome.find_element(By.CSS_SELECTOR, "#entries a.play"))
    player = chrome.find_element(By.ID, "player")
    assert "/_proxy/admin/audio/alice@example.com/t-1/m-1/af_nicole" in player.get_attribute("src")
    WebDriverWait(chrome, 10).until(
        lambda d: d.execute_script(
            "return arguments[0].readyState >= 2 || arguments[0].error !== null", player
        )
    )
    assert chrome.execute_script("return arguments[0].error", player) is None
    assert chrome.execute_script("return arguments[0].readyState", player) >= 2
    assert chrome.execute_script("return arguments[0].duration", player) > 1.0


def test_a_purge_through_the_form_is_followed_by_a_miss(
    chrome: Any, stack: LiveStack, proxy: LiveServer, fake_backend: FakeLegacyBackend
) -> None:
    for message in ("m-1", "m-2"):
        assert stack.speak(proxy, speak_body(message_id=message)).cache == "miss"
    stack.drain(proxy)
    log_in(chrome, proxy)

    chrome.get(f"{proxy.url}{ADMIN}/entries")
    row = next(
        r
        for r in chrome.find_elements(By.CSS_SELECTOR, "#entries tbody tr")
        if r.find_element(By.CSS_SELECTOR, "[data-label=message]").text == "m-1"
    )
    click(chrome, row.find_element(By.CSS_SELECTOR, "a.purge"))
    assert "Purge?" in chrome.find_element(By.TAG_NAME, "h1").text
    assert "m-1" in text_of(chrome, "scope")
    click(chrome, chrome.find_element(By.ID, "confirm-purge"))
    assert text_of(chrome, "purge-result") == "Purged: 1 entry removed."
    messages = [e.text for e in chrome.find_elements(By.CSS_SELECTOR, "[data-label=message]")]
    assert messages == ["m-2"]

    calls = fake_backend.calls["/api/tts/speak"]
    assert stack.speak(proxy, speak_body(message_id="m-1")).cache == "miss"
    assert fake_backend.calls["/api/tts/speak"] == calls + 1
    assert stack.speak(proxy, speak_body(message_id="m-2")).cache == "hit"

    # A whole user, from the filtered list.
    chrome.get(f"{proxy.url}{ADMIN}/entries?user=alice@example.com")
    click(chrome, chrome.find_element(By.ID, "purge-user"))
    click(chrome, chrome.find_element(By.ID, "confirm-purge"))
    assert text_of(chrome, "purge-result") == "Purged: 2 entries removed."
    assert chrome.find_element(By.ID, "no-entries")
    assert stack.speak(proxy, speak_body(message_id="m-2")).cache == "miss"


async def _forged_page(request: web.Request) -> web.Response:
    target = request.query["target"]
    return web.Response(
        content_type="text/html",
        text=(
            f'<form method="post" action="{target}{ADMIN}/purge">'
            '<input type="hidden" name="user" value="alice@example.com">'
            '<input type="hidden" name="csrf" value="00000000000000000000000000000000">'
            '<button id="go" type="submit">win a prize</button></form>'
        ),
    )


def test_a_forged_post_is_refused(chrome: Any, stack: LiveStack, proxy: LiveServer) -> None:
    assert stack.speak(proxy, speak_body()).cache == "miss"
    stack.drain(proxy)
    log_in(chrome, proxy)

    # A form added to a dashboard page, without the page's CSRF token.
    chrome.get(f"{proxy.url}{ADMIN}/entries")
    chrome.execute_script(
        """
        const form = document.createElement('form');
        form.method = 'post';
        form.action = '/_proxy/admin/purge';
        const user = document.createElement('input');
        user.name = 'user'; user.value = 'alice@example.com';
        form.appendChild(user);
        document.body.appendChild(form);
        form.submit();
        """
    )
    WebDriverWait(chrome, 5).until(lambda d: "403" in d.find_element(By.TAG_NAME, "body").text)

    # Another site (another port: same-site, so the Strict cookie goes along) posting a guess.
    forger = web.Application()
    forger.router.add_get("/", _forged_page)
    evil = stack.add(forger)
    chrome.get(f"{evil.url}/?target={proxy.url}")
    click(chrome, chrome.find_element(By.ID, "go"))
    WebDriverWait(chrome, 5).until(lambda d: "403" in d.find_element(By.TAG_NAME, "body").text)

    assert stack.speak(proxy, speak_body()).cache == "hit"


@pytest.mark.parametrize("width", [390])
def test_every_page_fits_a_phone_screen(
    chrome: Any, stack: LiveStack, proxy: LiveServer, width: int
) -> None:
    assert stack.speak(proxy, speak_body(), headers=ALICE).cache == "miss"
    stack.drain(proxy)
    chrome.set_window_size(width, 844)
    pages = [
        f"{ADMIN}/",
        f"{ADMIN}/entries",
        f"{ADMIN}/entry?user=alice@example.com&thread=t-1&message=m-1&voice=af_nicole",
        f"{ADMIN}/purge?user=alice@example.com&thread=t-1",
        f"{ADMIN}/config",
    ]
    chrome.get(f"{proxy.url}{ADMIN}/login")
    assert _fits(chrome), "login"
    log_in(chrome, proxy)
    for page in pages:
        chrome.get(f"{proxy.url}{page}")
        assert chrome.find_element(By.TAG_NAME, "h1").is_displayed()
        assert _fits(chrome), page


def _fits(chrome: Any) -> bool:
    """No horizontal scrolling: the page is as wide as the screen."""
    return bool(
        chrome.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1"
        )
    )


def test_a_content_entry_is_listed_as_text_and_plays(
    chrome: Any, stack: LiveStack, tmp_path: Path
) -> None:
    demo = stack.add(create_demo_app(use_espeak=False))
    settings = settings_for(
        tmp_path, demo.url, **{"admin.token": TOKEN, "tts.save_by_default": True}
    )
    proxy = stack.proxy(settings)
    body = {"text": "Keyed by its text, played in a browser", "voice": "af_nicole"}
    assert stack.speak(proxy, body).cache == "miss"
    stack.drain(proxy)

    log_in(chrome, proxy)
    chrome.get(f"{proxy.url}{ADMIN}/entries")
    row = chrome.find_element(By.CSS_SELECTOR, "#entries tbody tr")
    assert row.find_element(By.CSS_SELECTOR, "[data-label=thread]").text == "text"
    digest = row.find_element(By.CSS_SELECTOR, "[data-label=text]").text
    assert len(digest) == 13 and digest.endswith("…")
    assert row.find_element(By.CSS_SELECTOR, "[data-label=voice]").text == "af_nicole"
    assert _fits(chrome)
    click(chrome, row.find_element(By.CSS_SELECTOR, "a.play"))
    assert "its text" in text_of(chrome, "entry")
    player = chrome.find_element(By.ID, "player")
    assert "/_proxy/admin/audio/alice@example.com/_text/" in player.get_attribute("src")
    WebDriverWait(chrome, 10).until(
        lambda d: d.execute_script(
            "return arguments[0].readyState >= 2 || arguments[0].error !== null", player
        )
    )
    assert chrome.execute_script("return arguments[0].error", player) is None
    chrome.set_window_size(390, 844)
    assert _fits(chrome)
