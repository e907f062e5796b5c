"""Servers a real browser talks to: an event loop in a thread, the proxy and its backends on it.

Selenium blocks the test's thread while Chromium loads pages, so the servers cannot share the
test's event loop: they run on their own loop in a daemon thread, and the test hands coroutines
to it with `LiveLoop.run`.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from proxy.access_log import access_log_options
from proxy.app import create_app
from proxy.config import Settings
from proxy.state import CACHE
from tests.support import Spoken, speak

T = TypeVar("T")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--lang=en-US",
)


class LiveLoop:
    """An asyncio loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `work` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class LiveServer:
    """One app listening on 127.0.0.1."""

    runner: web.AppRunner
    url: str

    @property
    def app(self) -> web.Application:
        """The app being served."""
        return self.runner.app


async def serve(app: web.Application, **runner_options: Any) -> LiveServer:
    """Listen on a free loopback port."""
    runner = web.AppRunner(app, shutdown_timeout=0.5, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return LiveServer(runner, f"http://127.0.0.1:{port}")


@dataclass
class LiveStack:
    """The proxy (served as the CLI serves it) and whatever it needs, on one LiveLoop."""

    live: LiveLoop
    servers: list[LiveServer] = field(default_factory=list)

    def add(self, app: web.Application, **runner_options: Any) -> LiveServer:
        """Serve `app`; stopped by `close`."""
        server = self.live.run(serve(app, **runner_options))
        self.servers.append(server)
        return server

    def proxy(self, settings: Settings) -> LiveServer:
        """The proxy for `settings`, with the JSON access logger."""
        return self.add(create_app(settings), **access_log_options(settings, standalone=False))

    def speak(
        self, proxy: LiveServer, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Spoken:
        """A speak call to `proxy`, from this test (a trusted loopback peer)."""

        async def call() -> Spoken:
            async with aiohttp.ClientSession() as session:
                return await speak(session, f"{proxy.url}/api/tts/speak", body, headers)

        return self.live.run(call())

    def drain(self, proxy: LiveServer) -> None:
        """Wait for the proxy's Volume writes."""
        self.live.run(proxy.app[CACHE].drain())

    def clear_memory(self, proxy: LiveServer) -> None:
        """Empty the proxy's memory tier (on its loop), so the next hit comes from the Volume."""

        async def clear() -> None:
            memory = proxy.app[CACHE].memory
            assert memory is not None
            memory.clear()

        self.live.run(clear())

    def close(self) -> None:
        """Stop every server, newest first."""
        for server in reversed(self.servers):
            self.live.run(server.runner.cleanup())


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) when Debian's chromium and chromium-driver (or equivalents) are there."""
    browser = next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (found := shutil.which(name))
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    if driver is None and Path("/usr/lib/chromium/chromedriver").exists():
        driver = "/usr/lib/chromium/chromedriver"
    return (browser, driver) if browser and driver else None


def click(chrome: Any, element: Any) -> None:
    """Click, and wait for the page it leads to (a form post or a link)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    page = chrome.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(chrome, 10).until(expected_conditions.staleness_of(page))
