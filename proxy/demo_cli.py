"""`tts-cache-proxy demo`: the demo backend and the proxy in one process, and its banner."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from typing import Any

from aiohttp import web

from proxy.config import Settings, load_settings
from proxy.demo_page import DEMO_USER
from proxy.listen import listening


def demo_settings(config: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> Settings:
    """The demo's settings: `tts.save_by_default` is on unless the file or environment say.

    The app's current client sends no `save_to_volume`; the demo caches such calls so that its
    page and its banner show a hit. The product's default stays off (README, "Content keys").
    """
    sources: dict[str, str] = {}
    given = {key: value for key, value in overrides.items() if value is not None}
    settings = load_settings(config, overrides=given, sources=sources)
    if sources.get("tts.save_by_default") == "default":
        tts = dataclasses.replace(settings.tts, save_by_default=True)
        settings = dataclasses.replace(settings, tts=tts)
    return settings


async def run_demo(settings: Settings, backend_port: int) -> None:
    """Serve the demo backend and the proxy until SIGINT or SIGTERM."""
    from proxy.access_log import access_log_options
    from proxy.app import create_app, runner_shutdown_timeout
    from proxy.demo import create_demo_app

    host, port = settings.server.host, settings.server.port
    backend = web.AppRunner(create_demo_app())
    proxy = web.AppRunner(
        create_app(settings),
        shutdown_timeout=runner_shutdown_timeout(settings.server.shutdown_timeout_seconds),
        **access_log_options(settings),
    )
    await backend.setup()
    await proxy.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        with listening(host, backend_port, "--backend-port", "--backend-port"):
            await web.TCPSite(backend, host, backend_port).start()
        with listening(host, port, "--port", "--port"):
            await web.TCPSite(proxy, host, port).start()
        print(demo_banner(host, port, backend_port), flush=True)
        await stop.wait()
    finally:
        await proxy.cleanup()
        await backend.cleanup()


def demo_banner(host: str, port: int, backend_port: int) -> str:
    """What to try, printed at start."""
    body = (
        '{"text": "Hello from the cache", "voice": "af_nicole", '
        '"message_id": "m-1", "thread_id": "t-1", "save_to_volume": true}'
    )
    identity = f"-H 'X-Forwarded-Email: {DEMO_USER}'"
    speak = (
        f"curl -s -o /dev/null -D - -X POST http://{host}:{port}/api/tts/speak "
        f"-H 'Content-Type: application/json' {identity} -d '{body}'"
    )
    today = (
        f"curl -s -o /dev/null -D - -X POST http://{host}:{port}/api/tts/speak "
        f"-H 'Content-Type: application/json' {identity} "
        '-d \'{"text": "Hello again", "provider": "replicate", "voice": "af_nicole"}\''
    )
    return "\n".join(
        [
            f"demo backend on http://{host}:{backend_port}, proxy on http://{host}:{port}",
            "",
            f"In a browser: http://{host}:{port}/ and press Speak twice (miss, then hit).",
            "",
            "1. the first call is a miss (X-TTS-Cache: miss):",
            f"   {speak}",
            "2. the same call again is a hit (X-TTS-Cache: hit):",
            f"   {speak}",
            "3. the audio, cached, by its Content-Location (Range works too):",
            f"   curl -s -o hello.wav {identity} "
            f"http://{host}:{port}/_proxy/audio/t-1/m-1/af_nicole",
            "4. today's client sends no ids and no save_to_volume: keyed by its text, cached",
            "   because the demo sets tts.save_by_default = true (the product's default is false):",
            f"   {today}",
            "",
            f"{DEMO_USER} is a demo identity: the gateway names the user in production.",
            "Ctrl-C stops both.",
        ]
    )
