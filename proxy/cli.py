"""`tts-cache-proxy serve | check-config | demo`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.config import ConfigError, Settings, load_settings, redacted, to_toml

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    command = args.command or "serve"
    try:
        if command == "check-config":
            return _check_config(args)
        if command == "demo":
            return _demo(args)
        return _serve(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tts-cache-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the proxy")
    _config_argument(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    check = commands.add_parser("check-config", help="print the effective settings, redacted")
    _config_argument(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    demo = commands.add_parser("demo", help="the demo backend on :8000 and the proxy on :8080")
    _config_argument(demo)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080, help="the proxy's port")
    demo.add_argument("--backend-port", type=int, default=8000, help="the demo backend's port")
    return parser


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file (defaults apply to what it leaves out)")


def _load(args: argparse.Namespace, **overrides: Any) -> Settings:
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_settings(args.config, overrides=given)


def _check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    tree = redacted(settings)
    print(json.dumps(tree, indent=2) if args.json else to_toml(tree), end="")
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = _load(
        args,
        **{"server.host": getattr(args, "host", None), "server.port": getattr(args, "port", None)},
    )
    from proxy.app import create_app

    app = create_app(settings)
    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        shutdown_timeout=settings.server.shutdown_timeout_seconds,
        access_log=logging.getLogger("aiohttp.access") if settings.server.access_log else None,
        loop=new_event_loop(),
        print=lambda message: print(message, file=sys.stderr, flush=True),
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    backend_url = f"http://{args.host}:{args.backend_port}"
    settings = _load(
        args,
        **{"server.host": args.host, "server.port": args.port, "upstream.url": backend_url},
    )
    loop = new_event_loop()
    try:
        loop.run_until_complete(_run_demo(settings, args.backend_port))
    finally:
        loop.close()
    return 0


async def _run_demo(settings: Settings, backend_port: int) -> None:
    from proxy.app import create_app
    from proxy.demo import create_demo_app

    host, port = settings.server.host, settings.server.port
    backend = web.AppRunner(create_demo_app())
    proxy = web.AppRunner(
        create_app(settings), shutdown_timeout=settings.server.shutdown_timeout_seconds
    )
    await backend.setup()
    await proxy.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(backend, host, backend_port).start()
        await web.TCPSite(proxy, host, port).start()
        print(_demo_banner(host, port, backend_port), flush=True)
        await stop.wait()
    finally:
        await proxy.cleanup()
        await backend.cleanup()


def _demo_banner(host: str, port: int, backend_port: int) -> str:
    body = (
        '{"text": "Hello from the cache", "voice": "af_nicole", '
        '"message_id": "m-1", "thread_id": "t-1", "save_to_volume": true}'
    )
    speak = (
        f"curl -s -o /dev/null -D - -X POST http://{host}:{port}/api/tts/speak "
        f"-H 'Content-Type: application/json' -H 'X-Forwarded-Email: demo@example.com' "
        f"-d '{body}'"
    )
    return "\n".join(
        [
            f"demo backend on http://{host}:{backend_port}, proxy on http://{host}:{port}",
            "",
            "1. the first call is a miss (X-TTS-Cache: miss):",
            f"   {speak}",
            "2. the same call again is a hit (X-TTS-Cache: hit):",
            f"   {speak}",
            "3. the audio, cached, by its Content-Location (Range works too):",
            f"   curl -s -o hello.wav -H 'X-Forwarded-Email: demo@example.com' "
            f"http://{host}:{port}/_proxy/audio/t-1/m-1/af_nicole",
            "",
            "Ctrl-C stops both.",
        ]
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
