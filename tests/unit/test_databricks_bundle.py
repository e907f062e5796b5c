"""deploy/databricks/bundle.py: the legacy app's folder, command, env and requirements merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.databricks import bundle
from deploy.databricks.bundle import BundleError, assemble, merge_requirements

PINS = "# the proxy's\naiohttp==3.14.5\nasyncpg==0.32.0\nhttpx==0.29.0\n"


def legacy_app(tmp_path: Path, app_yaml: str | None = None, requirements: str = "") -> Path:
    folder = tmp_path / "legacy"
    (folder / "routers").mkdir(parents=True)
    (folder / "app.py").write_text("app = None\n")
    (folder / "routers" / "requirements.txt").write_text("nested, copied as it is\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    if app_yaml is not None:
        (folder / "app.yaml").write_text(app_yaml)
    if requirements:
        (folder / "requirements.txt").write_text(requirements)
    return folder


def test_requirements_met_by_the_pins_take_the_pin_and_keep_their_extras() -> None:
    legacy = "fastapi>=0.110\nasyncpg>=0.29,<1  # db\nhttpx[http2]>=0.27\n\n# note\n-r more.txt\n"

    merged, notes = merge_requirements(PINS, legacy)

    lines = merged.splitlines()
    assert "asyncpg==0.32.0" in lines and "httpx[http2]==0.29.0" in lines
    assert "fastapi>=0.110" in lines and "-r more.txt" in lines
    assert not any(line.startswith("asyncpg>") for line in lines)
    assert [line for line in lines if line.startswith("asyncpg")] == ["asyncpg==0.32.0"]
    assert any("-r more.txt" in note and "not checked" in note for note in notes)


def test_requirements_the_pins_do_not_meet_are_each_one_line() -> None:
    legacy = "aiohttp<3.10\nasyncpg==0.29.0\nhttpx @ https://example.com/httpx.whl\nrich\n"

    with pytest.raises(BundleError) as raised:
        merge_requirements(PINS, legacy)

    problems = raised.value.problems
    assert len(problems) == 3
    assert "'aiohttp<3.10'" in problems[0] and "aiohttp==3.14.5" in problems[0]
    assert "'asyncpg==0.29.0'" in problems[1]
    assert "httpx" in problems[2]


def test_the_legacy_command_goes_behind_the_proxy_with_its_own_port(tmp_path: Path) -> None:
    app_yaml = (
        "command: ['uvicorn', 'app:app', '--port', '$DATABRICKS_APP_PORT']\n"
        "env:\n"
        "  - name: DATABRICKS_VOLUME\n"
        "    value: /Volumes/main/chat/tts/\n"
        "  - name: REPLICATE_API_TOKEN\n"
        "    valueFrom: replicate\n"
    )
    folder = legacy_app(tmp_path, app_yaml, requirements="fastapi>=0.110\n")
    out = tmp_path / "out"

    made = assemble(folder, out)

    written = yaml.safe_load((out / "app.yaml").read_text())
    template = yaml.safe_load(bundle.TEMPLATE.read_text())
    prefix = template["command"][: template["command"].index("--") + 1]
    assert written["command"] == [*prefix, "uvicorn", "app:app", "--port", "{backend_port}"]
    # The rollback is the next line: the legacy command as it was.
    lines = (out / "app.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("command:"))
    assert yaml.safe_load(lines[at + 1].lstrip("# "))["command"] == [
        "uvicorn",
        "app:app",
        "--port",
        "$DATABRICKS_APP_PORT",
    ]
    # The legacy app's own entries stay as they were; the template adds what it lacks.
    names = [entry["name"] for entry in written["env"]]
    assert names == ["DATABRICKS_VOLUME", "REPLICATE_API_TOKEN", "PGHOST"]
    assert written["env"][0] == {"name": "DATABRICKS_VOLUME", "value": "/Volumes/main/chat/tts/"}
    assert any("{backend_port}" in note for note in made.notes)


def test_the_folder_holds_the_legacy_app_the_proxy_and_the_preset(tmp_path: Path) -> None:
    folder = legacy_app(tmp_path, requirements="fastapi>=0.110\n")
    out = tmp_path / "out"

    made = assemble(folder, out)

    assert (out / "app.py").read_text() == "app = None\n"
    assert (out / "routers" / "requirements.txt").read_text() == "nested, copied as it is\n"
    assert not (out / "__pycache__").exists()
    assert (out / "proxy" / "__main__.py").is_file()
    assert not list((out / "proxy").rglob("__pycache__"))
    assert (out / "tts-cache-proxy.toml").read_text() == bundle.PRESET.read_text()
    # Without an app.yaml of its own, the legacy app's command is the template's.
    assert (
        yaml.safe_load((out / "app.yaml").read_text())["command"]
        == (yaml.safe_load(bundle.TEMPLATE.read_text())["command"])
    )
    assert any("no app.yaml command" in note for note in made.notes)
    requirements = (out / "requirements.txt").read_text().splitlines()
    for pin in bundle.PINS.read_text().splitlines():
        if not pin.startswith("#"):
            assert pin in requirements
    assert "fastapi>=0.110" in requirements


def test_what_the_bundle_refuses(tmp_path: Path) -> None:
    folder = legacy_app(tmp_path)
    (folder / "pyproject.toml").write_text("[project]\nname = 'chat'\n")
    with pytest.raises(BundleError, match=r"pyproject\.toml only"):
        assemble(folder, tmp_path / "out")

    (folder / "proxy").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(BundleError) as raised:
        assemble(folder, tmp_path / "full")
    assert len(raised.value.problems) == 2  # a non-empty OUT, and a proxy/ of its own
    with pytest.raises(BundleError, match="inside the legacy app"):
        assemble(folder, folder / "out")


def test_the_command_line_reports_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = legacy_app(tmp_path, requirements="aiohttp<3\nasyncpg<0.1\n")

    code = bundle.main(["--legacy", str(folder), "--out", str(tmp_path / "out")])

    assert code == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("bundle: requirements:") for line in errors)
    assert not (tmp_path / "out").exists()
