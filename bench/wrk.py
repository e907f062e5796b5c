"""Throughput runs with wrk: a Lua script sets the POST body and headers, `done()` prints JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.procs import run_command

PERCENTILES: Final = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99)
MARKER: Final = "BENCH_JSON "

LUA_TEMPLATE: Final = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local points = {{}}
  for _, p in ipairs({{{percentiles}}}) do
    table.insert(points, string.format('"%s": %d', tostring(p), latency:percentile(p)))
  end
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "mean_us": %f, "max_us": %d, ' ..
    '"percentiles_us": {{%s}}}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, table.concat(points, ", ")))
end
"""


@dataclass
class WrkResult:
    """One wrk run, latencies in milliseconds."""

    requests: int
    seconds: float
    bytes: int
    errors: dict[str, int]
    percentiles_ms: dict[float, float]
    mean_ms: float
    max_ms: float
    command: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        """Requests per second over the run."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        """Socket errors, timeouts and non-2xx/3xx answers."""
        return sum(self.errors.values())

    @property
    def bytes_per_request(self) -> float:
        """Response bytes (headers included) per completed request."""
        return self.bytes / self.requests if self.requests else 0.0

    def curve(self) -> list[tuple[float, float]]:
        """(percentile, ms) points, for the distribution plot."""
        return [*sorted(self.percentiles_ms.items()), (100.0, self.max_ms)]


def lua_script(body: bytes, headers: Mapping[str, str]) -> str:
    """The wrk script that POSTs `body` with `headers` and reports as JSON."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body cannot be embedded in a Lua long string")
    lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items())
    return LUA_TEMPLATE.format(
        body=text,
        headers=lines,
        percentiles=", ".join(repr(p) for p in PERCENTILES),
        marker=MARKER,
    )


async def run_wrk(
    url: str,
    script: Path,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    cpus: str | None = None,
    pin: bool = False,
) -> WrkResult:
    """Run wrk against `url` for `seconds` and parse the JSON its script prints."""
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",  # wrk takes whole seconds
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    code, out, err = await run_command(command, limit_seconds=seconds + 30, cpus=cpus, pin=pin)
    line = next((x for x in out.splitlines() if x.startswith(MARKER)), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {code}): {err.strip() or out.strip()}")
    data = json.loads(line[len(MARKER) :])
    errors = {name: int(data[name]) for name in ("connect", "read", "write", "status", "timeout")}
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        bytes=int(data["bytes"]),
        errors=errors,
        percentiles_ms={float(p): v / 1000 for p, v in data["percentiles_us"].items()},
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        command=command,
    )
