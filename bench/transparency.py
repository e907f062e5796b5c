"""Transparency: the HTTP caching test suite run direct, through the proxy and through nginx.

http-tests/cache-tests (https://cache-tests.fyi) is not ours and is never copied here: give the
path of a checkout with its dependencies installed.

    git clone https://github.com/http-tests/cache-tests /tmp/cache-tests
    (cd /tmp/cache-tests && npm install)
    .venv/bin/python -m bench.transparency /tmp/cache-tests

The suite's origin server (`npm run server`) is started on a free port, the proxy
(`python -m proxy serve`) and nginx as a plain pass-through (`proxy_pass`, no `proxy_cache`) in
front of it, and the suite's client (`npm run cli`) runs against each in turn. A test is
identical through a peer when it ends exactly as it did direct (pass, or the same failure with the
same message; HTTP dates in messages are ignored). The proxy caches nothing on these paths, so
this measures what it changes in what a client sees, not caching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.peers import chown_tree, nginx_binary
from bench.procs import Child, Children, StartFailed, child_environment, free_port, wait_http
from proxy.config import to_toml

REPO = Path(__file__).resolve().parent.parent
HTTP_DATE = re.compile(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")
# A plain pass-through: what a user would put in front of the backend instead of the proxy.
NGINX_CONF = """\
{user_directive}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
Results = dict[str, Any]


def main(argv: list[str] | None = None) -> int:
    """Run the suite direct and through each peer; print how many tests ended the same way."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.transparency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkout", type=Path, help="a cache-tests checkout, after npm install")
    parser.add_argument("--peers", default="ours,nginx", help="comma-separated: ours, nginx")
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    parser.add_argument(
        "--proxy-source",
        type=Path,
        default=REPO,
        help="run the proxy package found in this folder (another revision) instead of this one",
    )
    args = parser.parse_args(argv)
    problem = checkout_problem(args.checkout)
    if problem is not None:
        print(f"transparency: {problem}", file=sys.stderr)
        return 2
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="transparency-") as temp:
        folder = Path(temp)
        folder.chmod(0o711)  # nginx's worker (nobody) walks into its prefix below
        runs = asyncio.run(
            run_all(args.checkout.resolve(), peers, folder, args.proxy_source.resolve())
        )
    print(report(runs))
    if args.out is not None:
        args.out.write_text(json.dumps(runs, indent=1, sort_keys=True))
    return 0


def checkout_problem(checkout: Path) -> str | None:
    """Why `checkout` cannot be run, or None."""
    package = checkout / "package.json"
    if not package.is_file() or "http-cache-tests" not in package.read_text():
        return f"{checkout} is not a cache-tests checkout (see python -m bench.transparency -h)"
    if not (checkout / "node_modules").is_dir():
        return f"run `npm install` in {checkout} first"
    if shutil.which("npm") is None:
        return "npm is not installed"
    return None


async def run_all(
    checkout: Path, peers: list[str], folder: Path, proxy_source: Path
) -> dict[str, Results]:
    """The suite's results direct and through each peer that could start (logs in `folder`)."""
    children = Children(folder, pin=False)
    try:
        origin_port = free_port()
        origin = await children.spawn(
            "origin",
            [
                "npm",
                "run",
                "--silent",
                "server",
                f"--port={origin_port}",
                f"--pidfile={folder / 'origin.pid'}",
            ],
            cwd=checkout,
        )
        origin_url = f"http://127.0.0.1:{origin_port}"
        await wait_http(origin, origin_url + "/", ok_only=False)
        runs = {"direct": await run_suite(checkout, origin_url)}
        for name in peers:
            started = await start_peer(name, children, folder, origin_port, proxy_source)
            if started is None:
                continue
            child, url = started
            runs[name] = await run_suite(checkout, url)
            await children.stop(child)
        return runs
    finally:
        await children.stop_all()


async def start_peer(
    name: str, children: Children, folder: Path, origin_port: int, proxy_source: Path
) -> tuple[Child, str] | None:
    """Start `name` in front of the origin; None (with a line on stderr) when it cannot."""
    origin_url = f"http://127.0.0.1:{origin_port}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if name == "ours":
        config = folder / "proxy.toml"
        settings = {
            "server": {"host": "127.0.0.1", "port": port, "access_log": False},
            "upstream": {"url": origin_url},
            "identity": {"mode": "none"},
            "cache": {"volume": {"kind": "none"}},
        }
        config.write_text(to_toml(settings))
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        env = child_environment(PYTHONPATH=str(proxy_source))
        child = await children.spawn("ours", argv, env=env, cwd=proxy_source)
        ready = f"{url}/_proxy/health"
    elif name == "nginx":
        binary = nginx_binary()
        if binary is None:
            print("transparency: nginx is not installed (scripts/bench-deps.sh)", file=sys.stderr)
            return None
        prefix = folder / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            # The master runs as root; its worker, as nobody, must own what it writes.
            user = "user nobody nogroup;"
            chown_tree(prefix, "nobody", "nogroup")
        (prefix / "nginx.conf").write_text(
            NGINX_CONF.format(
                user_directive=user, prefix=prefix, port=port, origin_port=origin_port
            )
        )
        argv = [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
        child = await children.spawn("nginx", argv)
        ready = f"{url}/"
    else:
        print(f"transparency: unknown peer {name!r}", file=sys.stderr)
        return None
    try:
        await wait_http(child, ready, ok_only=False)
    except StartFailed as exc:
        print(f"transparency: {name} did not start: {exc}", file=sys.stderr)
        await children.stop(child)
        return None
    return child, url


async def run_suite(checkout: Path, base_url: str) -> Results:
    """The suite's client against `base_url`: {test id: true or [kind, message]}."""
    process = await asyncio.create_subprocess_exec(
        "npm",
        "run",
        "--silent",
        "cli",
        f"--base={base_url}",
        cwd=checkout,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"cache-tests cli failed against {base_url}: {err.decode()[-500:]}")
    results: Results = json.loads(out)
    return results


def same_ending(direct: Any, through: Any) -> bool:
    """True when a test ended the same way direct and through a peer (dates aside)."""
    return bool(
        HTTP_DATE.sub("<date>", json.dumps(direct)) == HTTP_DATE.sub("<date>", json.dumps(through))
    )


def report(runs: dict[str, Results]) -> str:
    """How many tests ended as they did direct, per peer, and the ones that did not."""
    direct = runs["direct"]
    lines = []
    for name, results in runs.items():
        if name == "direct":
            continue
        differ = sorted(t for t in direct if not same_ending(direct[t], results.get(t)))
        lines.append(f"{name}: {len(direct) - len(differ)} of {len(direct)} identical to direct")
        for test in differ:
            lines.append(f"    {test}: direct {direct[test]!r}, through {results.get(test)!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
