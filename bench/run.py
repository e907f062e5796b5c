"""`python -m bench.run`: every scenario against every peer, then bench/results/latest.*."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from bench.peers import REPO, CpuPlan, Lab, nginx_binary
from bench.procs import Children
from bench.registry import RUNNERS, SCENARIOS
from bench.results import failed
from bench.scenarios import Bench, Options
from bench.targets import evaluate
from proxy.cli import new_event_loop

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
DEPS_SCRIPT = REPO / "scripts" / "bench-deps.sh"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0 even when targets are missed)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    wanted = [name.strip() for name in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [name for name in wanted if name not in SCENARIOS]
    only = tuple(name for name in SCENARIOS if name in wanted)
    if unknown:
        print(
            f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}", file=sys.stderr
        )
        return 2
    if not _system_tools():
        return 1
    _matplotlib()
    options = Options.quick() if args.quick else Options()
    cpus = CpuPlan.detect(enabled=not args.no_pin)
    if cpus.loadgen is not None:
        # The harness is a load generator too (the Python client): it keeps to the load CPU.
        os.sched_setaffinity(0, {int(cpus.loadgen)})
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            return runner.run(_run(options, only, cpus, args.output, args.keep_temp))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(
                "interrupted: every process started was stopped; no results written",
                file=sys.stderr,
            )
            return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    parser.add_argument(
        "--only", help=f"comma-separated scenarios to run, from: {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where latest.* go")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary folder (logs)")
    return parser


async def _run(
    options: Options, only: Sequence[str], cpus: CpuPlan, output: Path, keep_temp: bool
) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if main_task is not None:
            loop.add_signal_handler(signum, main_task.cancel)
    started, clock = datetime.now(UTC), time.monotonic()
    folder = _temporary_folder()
    children = Children(folder, pin=cpus.pinned, anywhere=cpus.anywhere)
    lab = Lab(children, folder, cpus)
    bench: Bench | None = None
    try:
        backend = await lab.backend()
        bench = Bench(lab, backend, options, folder, cpus)
        for name in only:
            log.info("scenario: %s", name)
            try:
                await RUNNERS[name](bench)
            except Exception as exc:
                log.exception("scenario %s failed", name)
                bench.add(failed(name, "-", "-", 0, exc))
    finally:
        await children.stop_all()
        for cleanup in bench.cleanups if bench is not None else ():
            with contextlib.suppress(Exception):
                cleanup()
        if not keep_temp:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log.info("logs and configs kept in %s", folder)
    meta = await _meta(options, cpus, started, time.monotonic() - clock, only)
    rows = bench.rows if bench is not None else []
    verdicts = evaluate(rows, options.sizes)
    paths = report.write_all(output, meta, rows, verdicts)
    print(report.markdown(meta, rows, verdicts))
    print("written: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _temporary_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tts-bench-"))
    folder.chmod(0o711)  # nginx's worker (nobody) walks into its prefix below
    return folder


def _system_tools() -> bool:
    """wrk and nginx, installed through scripts/bench-deps.sh when missing."""
    if shutil.which("wrk") and nginx_binary():
        return True
    if DEPS_SCRIPT.exists():
        subprocess.run([str(DEPS_SCRIPT)], check=False)
    if shutil.which("wrk"):
        return True
    print("wrk is required: install it (Debian: apt-get install wrk)", file=sys.stderr)
    return False


def _matplotlib() -> None:
    """matplotlib for the plot, installed into this interpreter when missing."""
    if importlib.util.find_spec("matplotlib") is not None:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib>=3.8"]
    if subprocess.run(command, check=False).returncode != 0:
        print("matplotlib is missing: latest.png will not be drawn", file=sys.stderr)
    importlib.invalidate_caches()


async def _meta(
    options: Options, cpus: CpuPlan, started: datetime, seconds: float, only: Sequence[str]
) -> dict[str, Any]:
    cpu_model = _cpu_model()
    software = [
        f"Python {platform.python_version()}",
        f"aiohttp {aiohttp.__version__}",
        f"uvloop {_version('uvloop')}",
        await _tool_version(["nginx", "-v"]),
        await _tool_version(["wrk", "-v"]),
    ]
    load = (
        f"wrk -t1 -c{options.connections}, {options.warmup_seconds:g} s warm-up then "
        f"{options.seconds:g} s per row; Python client (aiohttp on uvloop) for miss "
        f"({options.miss_concurrency} concurrent per peer, all peers at once, "
        f"{options.miss_seconds:g} s), burst "
        f"({options.burst_size} x {options.burst_rounds} rounds) and replay "
        f"({options.replay_requests:,} requests, {options.replay_concurrency} concurrent)"
    )
    return {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds,
        "machine": f"{os.cpu_count()} CPUs ({cpu_model}), Linux {platform.release()}",
        "software": ", ".join(s for s in software if s),
        "load": load,
        "cpus": cpus.describe(),
        "scenarios": list(only),
        "options": {k: v for k, v in vars(options).items()},
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


async def _tool_version(command: list[str]) -> str:
    binary = nginx_binary() if command[0] == "nginx" else shutil.which(command[0])
    if binary is None:
        return ""
    process = await asyncio.create_subprocess_exec(
        binary, *command[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    first = out.decode(errors="replace").strip().splitlines()
    text = first[0] if first else command[0]
    return text.replace("nginx version: ", "").split(" Copyright")[0].strip()


if __name__ == "__main__":
    raise SystemExit(main())
