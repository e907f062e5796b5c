"""`make run`'s page in real headless Chromium: press Speak twice, see miss, then hit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.demo import create_demo_app, get_demo_stats
from proxy.demo_cli import demo_settings
from tests.e2e.live import LiveServer, LiveStack

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

# As in test_dashboard.py: chromedriver's rare node-of-a-replaced-page errors get two more tries.
pytestmark = pytest.mark.flaky(reruns=2)


def demo_stack(stack: LiveStack, tmp_path: Path) -> tuple[LiveServer, LiveServer]:
    """The demo backend and the proxy in front of it, with the demo command's settings."""
    backend = stack.add(create_demo_app(use_espeak=False))
    settings = demo_settings(
        None, {"upstream.url": backend.url, "cache.volume.path": str(tmp_path / "volume")}
    )
    return backend, stack.proxy(settings)


def press_speak(chrome: Any) -> str:
    """Click Speak and wait for the answer's X-TTS-Cache."""
    outcome = chrome.find_element(By.ID, "outcome")
    chrome.execute_script("arguments[0].textContent = ''", outcome)
    chrome.find_element(By.ID, "speak-button").click()
    WebDriverWait(chrome, 10).until(lambda _: outcome.text != "")
    return str(outcome.text)


def test_speak_twice_is_a_miss_then_a_hit(browser: Any, stack: LiveStack, tmp_path: Path) -> None:
    backend, proxy = demo_stack(stack, tmp_path)
    browser.get(f"{proxy.url}/")
    # The demo identity is said on the page, not hidden in its script.
    assert "demo@example.com" in browser.find_element(By.ID, "demo-identity").text
    # Today's client: no ids, no save_to_volume (the demo saves such calls).
    assert press_speak(browser) == "miss"
    assert press_speak(browser) == "hit"
    result = browser.find_element(By.ID, "result").text
    assert "cache-status: tts-cache-proxy; hit; detail=memory" in result
    assert "content-location: /_proxy/audio/_text/" in result
    # The planned client: message ids, save_to_volume true.
    browser.find_element(By.ID, "ids").click()
    Select(browser.find_element(By.ID, "save")).select_by_value("true")
    assert press_speak(browser) == "miss"
    assert press_speak(browser) == "hit"
    assert (
        "content-location: /_proxy/audio/t-1/m-1/af_nicole"
        in browser.find_element(By.ID, "result").text
    )
    # save_to_volume: false is never cached, and says why.
    Select(browser.find_element(By.ID, "save")).select_by_value("false")
    assert press_speak(browser) == "disabled"
    assert "detail=save-off" in browser.find_element(By.ID, "result").text
    assert get_demo_stats(backend.app).speak_calls == 3
