"""What can be checked of the Dockerfile without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


def test_slim_base_non_root_user_and_health_check() -> None:
    assert instructions("FROM") == ["python:3.12-slim"]
    assert instructions("USER") == ["proxy"]
    (check,) = instructions("HEALTHCHECK")
    assert "/_proxy/health" in check and "8080" in check


def test_config_is_mounted_where_the_command_reads_it() -> None:
    (command,) = instructions("CMD")
    assert "/etc/tts-cache-proxy/config.toml" in command
    copies = instructions("COPY")
    assert "config/docker.toml /etc/tts-cache-proxy/config.toml" in copies
    for copy in copies:
        source = copy.split()[0]
        assert source == "." or (ROOT / source).exists()


def test_ignored_files_do_not_hide_what_the_build_needs() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("proxy", "pyproject.toml", "config", "README.md"):
        assert needed not in ignored
