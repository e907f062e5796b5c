"""What keeps the proxy's resident memory down: modules it does not need, one malloc arena.

Each check runs in a fresh interpreter, since this test session has imported everything already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_without_dashboard_or_index_jinja2_and_asyncpg_stay_unloaded() -> None:
    out = run(
        """
        import sys
        from proxy.app import create_app
        from proxy.config import load_settings
        create_app(load_settings(env={}, overrides={"cache.volume.path": "/tmp/unused"}))
        print(sorted(m for m in ("jinja2", "aiohttp_jinja2", "asyncpg") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_the_dashboard_loads_jinja2_when_it_is_on() -> None:
    out = run(
        """
        import sys
        from proxy.app import create_app
        from proxy.config import load_settings
        settings = load_settings(
            env={}, overrides={"cache.volume.path": "/tmp/unused", "admin.token": "t" * 32}
        )
        create_app(settings)
        print("jinja2" in sys.modules)
        """
    )
    assert out == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_one_malloc_arena_unless_the_operator_chose() -> None:
    code = "from proxy.heap import single_arena; print(single_arena())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "True"
    assert run(code, MALLOC_ARENA_MAX="4") == "False"
