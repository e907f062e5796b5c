"""deploy/databricks/requirements.txt: the lock's run-time pins, the tested ones, installable."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from scripts import lock

# Databricks Apps: Python 3.11 on Ubuntu 22.04 (glibc 2.35), x86_64.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in (35, 34, 31, 28, 27, 24, 17, 12, 5)]


def pins() -> dict[str, str]:
    """The deployed pins: {normalized name: version}."""
    found: dict[str, str] = {}
    for line in lock.DEPLOY_REQUIREMENTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            found[lock.normalize(name)] = version
    return found


def test_the_deployed_pins_are_what_the_lock_gives() -> None:
    assert lock.DEPLOY_REQUIREMENTS.read_text() == lock.expected_requirements(), (
        "deploy/databricks/requirements.txt drifted from requirements.lock: run `make lock`"
    )


def test_the_lock_pins_every_runtime_dependency_and_no_test_tool() -> None:
    deployed = pins()
    for requirement in lock.runtime_names(lock.PYPROJECT.read_text()):
        assert requirement in deployed
    for tool in ("pytest", "mypy", "ruff", "selenium", "fastapi", "pysocks"):
        assert tool not in deployed  # pysocks: selenium's urllib3[socks], not the proxy's
    assert not lock._applies(Requirement('pysocks; extra == "socks"'), ())
    assert lock._applies(Requirement('pysocks; extra == "socks"'), ("socks",))


def test_the_tests_run_on_the_deployed_versions() -> None:
    installed = {name: metadata.version(name) for name in pins()}
    assert installed == pins(), "the venv differs from the lock: run `make lock` (or `make test`)"


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def test_the_deployed_pins_install_on_the_platform(tmp_path: Path) -> None:
    if not pypi_reachable():
        pytest.skip("pypi.org:443 unreachable: cannot check that the pins install")
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        f"--report={report}",
        f"--target={tmp_path / 'target'}",
        f"--python-version={lock.PYTHON_VERSION}",
        *(f"--platform={platform}" for platform in PLATFORMS),
        "--only-binary=:all:",
        "-r",
        str(lock.DEPLOY_REQUIREMENTS),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in result.stderr.splitlines() if "is ignored" not in line]
    assert result.returncode == 0, "\n".join(errors)

    # A complete set: resolving it installs exactly these, nothing missing, nothing more.
    resolved = {
        lock.normalize(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved == pins()
