"""Screenshots of each dashboard page, from real traffic through the demo backend.

They go to a temporary folder, or to docs/screenshots with UPDATE_SCREENSHOTS=1:
`UPDATE_SCREENSHOTS=1 .venv/bin/pytest tests/e2e/test_screenshots.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import create_demo_app
from proxy.state import HISTORY
from tests.conftest import settings_for
from tests.e2e.live import LiveServer, LiveStack, click
from tests.support import TOKEN, speak_body

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By

# Browser steps can hit chromedriver's stale-node errors; see test_dashboard.py.
pytestmark = pytest.mark.flaky(reruns=2)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
USERS = ["alice@example.com", "bob@example.com", "carol@example.com"]
LINES = [
    "Good morning! Here is your summary for today.",
    "The meeting moved to three o'clock.",
    "Your order has shipped and arrives on Friday.",
    "Remember to water the plants.",
    "Three new messages are waiting in the team thread.",
]


def traffic(stack: LiveStack, proxy: LiveServer, minutes: int = 45) -> None:
    """Replays over most of an hour, time compressed: real requests, one history minute each.

    Each minute a few new messages are read aloud (misses) and older ones replayed (hits), so
    the hit ratio climbs as the cache fills; twice the memory tier is emptied, as by a restart,
    and the next replays come from the Volume.
    """
    history = proxy.app[HISTORY]
    now = time.time()
    spoken: list[tuple[str, str, str]] = []
    for minute in range(minutes):
        history.clock = lambda m=minute: now - (minutes - m) * 60
        for n in range(2 if minute < 30 else 1):
            user = USERS[(minute + n) % len(USERS)]
            spoken.append((user, f"t-{minute % 3 + 1}", f"m-{minute:02d}{n}"))
        for step in range(3 + minute % 5):
            user, thread, message = spoken[(minute * 7 + step * 5) % len(spoken)]
            line = LINES[int(message[2:]) % len(LINES)]
            body = speak_body(text=line, thread_id=thread, message_id=message)
            stack.speak(proxy, body, headers={"X-Forwarded-Email": user})
        if minute in (14, 33):
            stack.drain(proxy)
            stack.clear_memory(proxy)
        stack.live.run(_sample(history))
    history.clock = time.time
    stack.drain(proxy)


async def _sample(history: Any) -> None:
    history.sample()


def save(chrome: Any, folder: Path, name: str, width: int = 1280, height: int = 0) -> Path:
    """A PNG of the whole page, or of its first `height` pixels."""
    chrome.set_window_size(width, 900)
    page, frame = chrome.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    chrome.set_window_size(width, min(height or int(page), 4000) + int(frame))
    path = folder / name
    chrome.save_screenshot(str(path))
    return path


def test_screenshots_of_every_page(browser: Any, stack: LiveStack, tmp_path: Path) -> None:
    folder = DOCS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path / "shots"
    folder.mkdir(parents=True, exist_ok=True)
    demo = stack.add(create_demo_app(use_espeak=False, latency_seconds=0.02))
    settings = settings_for(tmp_path, demo.url, **{"admin.token": TOKEN})
    proxy = stack.proxy(settings)
    traffic(stack, proxy)

    chrome = browser
    chrome.delete_all_cookies()
    chrome.get(f"{proxy.url}/_proxy/admin/login")
    shots = [save(chrome, folder, "login.png")]
    chrome.find_element(By.ID, "token").send_keys(TOKEN)
    click(chrome, chrome.find_element(By.ID, "login"))
    chrome.find_element(By.CSS_SELECTOR, "svg.chart")
    shots.append(save(chrome, folder, "overview.png"))
    chrome.get(f"{proxy.url}/_proxy/admin/entries")
    shots.append(save(chrome, folder, "entries.png"))
    chrome.get(f"{proxy.url}/_proxy/admin/entries?user=alice@example.com")
    shots.append(save(chrome, folder, "entries-phone.png", width=390, height=844))
    click(chrome, chrome.find_element(By.CSS_SELECTOR, "#entries a.play"))
    chrome.find_element(By.ID, "player")
    shots.append(save(chrome, folder, "entry.png"))
    chrome.get(f"{proxy.url}/_proxy/admin/config")
    shots.append(save(chrome, folder, "config.png"))
    chrome.delete_all_cookies()
    chrome.set_window_size(1280, 900)

    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
        assert shot.stat().st_size > 10_000, shot
