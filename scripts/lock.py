"""The dependency lock: requirements.lock from pyproject.toml, and the deployed pins from it.

`python scripts/lock.py compile` resolves the runtime and test dependencies against PyPI for the
platform the app runs on (Python 3.11, Linux x86_64: Databricks Apps) into requirements.lock,
with uv. `python scripts/lock.py deploy` writes deploy/databricks/requirements.txt: the lock's
runtime subset (what the proxy imports, and what that needs), every version exact. `make lock`
runs both; `python scripts/lock.py check` fails when the deployed pins drifted from the lock.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
DEPLOY_REQUIREMENTS = ROOT / "deploy/databricks/requirements.txt"
PYTHON_VERSION = "3.11"
# Databricks Apps: Ubuntu 22.04 (glibc 2.35) on x86_64.
PLATFORM = "x86_64-manylinux_2_35"
# The extras the tests need besides the runtime; the lock covers them so that the tests run on
# the very versions deployed.
LOCKED_EXTRAS = ("test",)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")

HEADER = """\
# The proxy's runtime dependencies, every version exact: Databricks Apps installs this file.
# Generated from requirements.lock by `make lock` (scripts/lock.py); do not edit by hand.
# `make test` checks that it matches the lock, that the tests ran on these versions, and that
# it installs on Python {python} for Linux.
"""


def normalize(name: str) -> str:
    """A project name as PyPI compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def compile_lock() -> None:
    """Resolve pyproject.toml (runtime and test extras) into requirements.lock with uv."""
    command = [
        sys.executable,
        "-m",
        "uv",
        "pip",
        "compile",
        str(PYPROJECT.relative_to(ROOT)),
        *(f"--extra={extra}" for extra in LOCKED_EXTRAS),
        f"--python-version={PYTHON_VERSION}",
        f"--python-platform={PLATFORM}",
        "--no-header",
        "--quiet",
        f"--output-file={LOCK.relative_to(ROOT)}",
    ]
    subprocess.run(command, cwd=ROOT, check=True)
    body = LOCK.read_text()
    header = (
        "# Every dependency of the proxy and its tests, pinned, for Python "
        f"{PYTHON_VERSION} on Linux x86_64.\n"
        "# Generated from pyproject.toml by `make lock` (scripts/lock.py); do not edit by hand.\n"
    )
    LOCK.write_text(header + body)


def parse_lock(text: str) -> dict[str, tuple[str, str]]:
    """The lock's pins: {normalized name: (name, version)}."""
    pins: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            pins[normalize(match.group(1))] = (match.group(1), match.group(2))
    return pins


def _applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    """Whether `requirement` is needed here (this Python, Linux) with `extras` asked for."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))


def runtime_names(pyproject: str) -> set[str]:
    """The proxy's run-time dependencies and theirs, from the installed packages' metadata.

    The lock's `# via` notes cannot tell a dependency's extra (selenium's urllib3[socks]) from
    the dependency itself, so the walk reads each package's own requirements, extras included
    only where asked for. The venv is installed from the lock, so these are the lock's versions
    (the tests check it).
    """
    top = [Requirement(text) for text in tomllib.loads(pyproject)["project"]["dependencies"]]
    pending = [(req.name, frozenset(req.extras)) for req in top if _applies(req, ())]
    expanded: dict[str, frozenset[str]] = {}
    while pending:
        name, extras = pending.pop()
        key = normalize(name)
        known = expanded.get(key)
        if known is not None and extras <= known:
            continue
        extras |= known or frozenset()
        expanded[key] = extras
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed: install the venv from the lock") from None
        for text in requirements:
            child = Requirement(text)
            if _applies(child, extras):
                pending.append((child.name, frozenset(child.extras)))
    return set(expanded)


def runtime_pins(lock: str, pyproject: str) -> list[tuple[str, str]]:
    """The lock's pins the proxy needs at run time, sorted by name."""
    pins = parse_lock(lock)
    needed = runtime_names(pyproject)
    missing = sorted(needed - set(pins))
    if missing:
        raise SystemExit(f"requirements.lock lacks {', '.join(missing)}: run `make lock`")
    return sorted((pins[key] for key in needed), key=lambda pin: normalize(pin[0]))


def render_requirements(pins: list[tuple[str, str]]) -> str:
    """deploy/databricks/requirements.txt for `pins`."""
    lines = [f"{name}=={version}" for name, version in pins]
    return HEADER.format(python=PYTHON_VERSION) + "\n".join(lines) + "\n"


def expected_requirements() -> str:
    """What `deploy` writes from the committed lock and pyproject.toml."""
    return render_requirements(runtime_pins(LOCK.read_text(), PYPROJECT.read_text()))


def main(argv: list[str] | None = None) -> int:
    """compile | deploy | check."""
    parser = argparse.ArgumentParser(prog="scripts/lock.py", description=__doc__)
    parser.add_argument("action", choices=["compile", "deploy", "check"])
    action = parser.parse_args(argv).action
    if action == "compile":
        compile_lock()
        return 0
    expected = expected_requirements()
    if action == "deploy":
        DEPLOY_REQUIREMENTS.write_text(expected)
        return 0
    if DEPLOY_REQUIREMENTS.read_text() != expected:
        print(f"{DEPLOY_REQUIREMENTS.relative_to(ROOT)} differs from the lock: run `make lock`")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
