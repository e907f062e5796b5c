"""Fixtures for the end-to-end tests: the servers' loop, a test's servers, headless Chromium, and
the fleet tests' `serve --workers N` groups."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.groups import start_group  # noqa: F401 - the fleet tests' fixture
from tests.e2e.live import CHROMIUM_FLAGS, LiveLoop, LiveStack, chromium_paths


@pytest.fixture(scope="module")
def live() -> Iterator[LiveLoop]:
    """The module's server loop."""
    loop = LiveLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def stack(live: LiveLoop) -> Iterator[LiveStack]:
    """A test's servers, stopped after it."""
    servers = LiveStack(live)
    try:
        yield servers
    finally:
        servers.close()


def _retrying(navigate: Callable[[str], None]) -> Callable[[str], None]:
    """chromedriver now and then fails a navigation with "unhandled inspector error": retry it."""
    from selenium.common.exceptions import WebDriverException

    def get(url: str) -> None:
        for attempt in range(3):
            try:
                navigate(url)
                return
            except WebDriverException as exc:
                if attempt == 2 or "inspector error" not in str(exc):
                    raise
                time.sleep(0.2)

    return get


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver, with a fresh profile; skipped when absent."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        pytest.skip(
            "chromium and chromedriver not found: install Debian's chromium and "
            "chromium-driver (make test does, as root)"
        )
    binary, driver_path = paths
    profile = tempfile.mkdtemp(prefix="tts-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(20)
    driver.get = _retrying(driver.get)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
