"""The speak handler's own time on a memory hit, in-process: this revision beside another.

    .venv/bin/python -m bench.hit_path --base DIR [--rounds 15] [--requests 2000]

wrk's figures on a shared 2-core machine move by tens of percent from one run to the next; this
times only the Python work of `SpeakHandler.handle` for a request that is a memory hit (identity,
the remembered parse and decision, the memory lookup, the prebuilt hit headers), without sockets.
Each revision runs in a child process of its own (`PYTHONPATH` = its source: the repository, or
`--base`, e.g. a `git archive` of the base commit), the two alternating round by round; a round
is `--requests` hits, and a revision's figure is its best round (the least disturbed by whatever
else the machine does), beside the median.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
BODY = {
    "text": "Hello from the cache",
    "voice": "af_nicole",
    "message_id": "m-1",
    "thread_id": "t-1",
    "save_to_volume": True,
}


def main(argv: list[str] | None = None) -> None:
    """Alternate the two revisions' rounds and print per-hit microseconds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", type=Path, required=True, help="the other revision's source")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.rounds, args.requests))))
        return
    found: dict[str, list[float]] = {"this": [], "base": []}
    for _ in range(args.rounds):
        for name, source in (("this", REPO), ("base", args.base.resolve())):
            found[name] += _child(source, args.requests)
    for name, rounds in found.items():
        print(
            f"{name}: best {min(rounds):.2f} us per hit, median {statistics.median(rounds):.2f} us"
            f" ({len(rounds)} rounds of {args.requests})"
        )


def _child(source: Path, requests: int) -> list[float]:
    """One round in a fresh process running `source`'s proxy package."""
    env = {"PYTHONPATH": f"{source}:{REPO}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.hit_path", "--child", "--base", ".", "--rounds", "3",
         "--requests", str(requests)],
        env=env, cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    rounds: list[float] = json.loads(done.stdout)
    return rounds


class _Loopback:
    """The transport a request from 127.0.0.1 would have (what the identity rules look at)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


async def _measure(rounds: int, requests: int) -> list[float]:
    from aiohttp import StreamReader, web
    from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

    from proxy.app import create_app
    from proxy.config import load_settings

    try:
        from proxy.state import SPEAK_HANDLER
    except ImportError:  # a revision from before proxy/state.py held the app's keys
        from proxy.app import SPEAK_HANDLER  # type: ignore[attr-defined,no-redef]
    from tests.fakes.legacy_backend import FakeLegacyBackend

    backend = FakeLegacyBackend()
    await backend.start()
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(
            env={},
            overrides={"upstream.url": backend.url, "cache.volume.path": folder},
        )
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        try:
            headers = {"X-Forwarded-Email": "alice@example.com"}
            for expected in ("miss", "hit"):
                async with client.post("/api/tts/speak", json=BODY, headers=headers) as response:
                    await response.read()
                    assert response.headers["X-TTS-Cache"] == expected
            app = client.server.app
            handler = app[SPEAK_HANDLER]
            extra = _contract_argument(handler, settings)
            raw = json.dumps(BODY).encode()
            transport = _Loopback()
            loop = asyncio.get_running_loop()
            per_hit: list[float] = []
            for _ in range(rounds):
                batch = []
                for _ in range(requests):
                    payload = StreamReader(mock.Mock(), 2**16, loop=loop)
                    payload.feed_data(raw)
                    payload.feed_eof()
                    batch.append(
                        make_mocked_request(
                            "POST",
                            "/api/tts/speak",
                            headers={**headers, "Content-Type": "application/json"},
                            app=app,
                            payload=payload,
                            transport=transport,
                        )
                    )
                started = time.perf_counter()
                for request in batch:
                    response = await handler.handle(request, *extra)
                elapsed = time.perf_counter() - started
                assert isinstance(response, web.Response)
                assert response.headers["X-TTS-Cache"] == "hit"
                per_hit.append(elapsed / requests * 1e6)
            return per_hit
        finally:
            await client.close()
            await backend.stop()


def _contract_argument(handler: Any, settings: Any) -> tuple[Any, ...]:
    """The route's contract, for a handler that takes one (revisions with speak contracts)."""
    if "contract" not in inspect.signature(handler.handle).parameters:
        return ()
    from proxy.contracts import speak_contracts  # type: ignore[import-not-found,unused-ignore]

    return (speak_contracts(settings)[0],)


if __name__ == "__main__":
    main()
