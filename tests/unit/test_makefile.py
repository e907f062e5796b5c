"""The Makefile's two commands: `make run` installs the product alone, `make test` everything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def planned(tmp_path: Path, target: str) -> str:
    """The commands `make TARGET` would run in a fresh clone (no venv yet), without running."""
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    done = subprocess.run(
        ["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_the_product_without_the_test_tools(tmp_path: Path) -> None:
    commands = planned(tmp_path, "run")

    installs = [line for line in commands.splitlines() if "pip install" in line and " -e " in line]
    assert installs, commands
    assert all("[test]" not in line for line in installs), installs
    assert "tts-cache-proxy demo" in commands


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_installs_the_test_tools(tmp_path: Path) -> None:
    commands = planned(tmp_path, "pytest")

    assert any("pip install" in line and "'.[test]'" in line for line in commands.splitlines())
