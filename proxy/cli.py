"""`tts-cache-proxy serve | check-config | purge | demo`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import __version__
from proxy.config import ConfigError, Settings, load_settings, redacted, to_toml
from proxy.event_loop import new_event_loop
from proxy.listen import SERVE_PORT, listening
from proxy.log_lines import quiet_malformed_requests
from proxy.supervisor import (
    check_backend_command,
)
from proxy.workers import serve_workers

if TYPE_CHECKING:
    pass

EXIT_CONFIG = 2

log = logging.getLogger("proxy.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_malformed_requests()
    command = args.command or "serve"
    try:
        if command == "check-config":
            return _check_config(args)
        if command == "demo":
            return _demo(args)
        if command == "purge":
            return _purge(args)
        return _serve(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tts-cache-proxy",
        description="A caching reverse proxy for text-to-speech in front of a chat backend.",
        epilog="`tts-cache-proxy COMMAND --help` tells more about each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the proxy")
    _config_argument(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "backend",
        nargs="*",
        metavar="-- CMD",
        help="the legacy backend to start and supervise (overrides upstream.command)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT), each with its own memory tier",
    )
    check = commands.add_parser("check-config", help="print the effective settings, redacted")
    _config_argument(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    demo = commands.add_parser("demo", help="the demo backend on :8000 and the proxy on :8080")
    _config_argument(demo)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080, help="the proxy's port")
    demo.add_argument("--backend-port", type=int, default=8000, help="the demo backend's port")
    purge = commands.add_parser(
        "purge", help="remove cached entries (a user, thread, message, voice, or --all)"
    )
    _config_argument(purge)
    purge.add_argument("--user")
    purge.add_argument("--thread")
    purge.add_argument("--message")
    purge.add_argument("--voice")
    purge.add_argument("--all", action="store_true", help="everything in the cache")
    purge.add_argument(
        "--url", help="the running proxy's base URL (default: server.host and server.port)"
    )
    return parser


def _purge(args: argparse.Namespace) -> int:
    from proxy.purge_cli import run_purge
    from proxy.storage.scope import BadScope, Scope

    settings = _load(args)
    try:
        scope = Scope.parse(
            user=args.user,
            thread_id=args.thread,
            message_id=args.message,
            voice=args.voice,
            everything=args.all,
        )
    except BadScope as exc:
        print(f"purge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    outcome = asyncio.run(run_purge(settings, scope, args.url))
    if outcome.answer is not None:
        print(json.dumps(outcome.answer))
    if outcome.message:
        print(outcome.message, file=sys.stderr)
    return outcome.code


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file (defaults apply to what it leaves out)")


def _load(args: argparse.Namespace, **overrides: Any) -> Settings:
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_settings(args.config, overrides=given)


def _warn_about(settings: Settings) -> None:
    """Settings that load but will not do what the operator likely wants: one line each."""
    from proxy.identity import loopback_trust_warning

    warning = loopback_trust_warning(settings.server.host, settings.identity)
    if warning:
        log.warning("%s", warning)


def _check_config(args: argparse.Namespace) -> int:
    sources: dict[str, str] = {}
    settings = load_settings(args.config, sources=sources)
    _warn_about(settings)
    tree = redacted(settings)
    # TOML: each value with where it came from, as a comment; JSON: the settings alone.
    print(json.dumps(tree, indent=2) if args.json else to_toml(tree, notes=sources), end="")
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = _load(
        args,
        **{
            "server.host": getattr(args, "host", None),
            "server.port": getattr(args, "port", None),
            "upstream.command": getattr(args, "backend", None) or None,
        },
    )
    workers = getattr(args, "workers", 1)
    if workers < 1:
        raise ConfigError("--workers", f"must be 1 or more, got {workers}")
    check_backend_command(settings)
    _warn_about(settings)
    if settings.upstream.command and workers == 1:
        from proxy.supervisor import serve_with_backend

        loop = new_event_loop()
        try:
            return loop.run_until_complete(serve_with_backend(settings))
        finally:
            loop.close()
    if workers > 1:
        return serve_workers(settings, workers)
    from proxy.access_log import access_log_options
    from proxy.app import create_app, runner_shutdown_timeout
    from proxy.heap import single_arena

    single_arena()
    app = create_app(settings)
    with listening(settings.server.host, settings.server.port, *SERVE_PORT):
        web.run_app(
            app,
            host=settings.server.host,
            port=settings.server.port,
            shutdown_timeout=runner_shutdown_timeout(settings.server.shutdown_timeout_seconds),
            **access_log_options(settings),
            loop=new_event_loop(),
            print=lambda message: print(message, file=sys.stderr, flush=True),
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo_cli import demo_settings, run_demo

    backend_url = f"http://{args.host}:{args.backend_port}"
    settings = demo_settings(
        args.config,
        {"server.host": args.host, "server.port": args.port, "upstream.url": backend_url},
    )

    loop = new_event_loop()
    try:
        loop.run_until_complete(run_demo(settings, args.backend_port))
    finally:
        loop.close()
    return 0
