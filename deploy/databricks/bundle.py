"""Assemble a folder to deploy as one Databricks App: the legacy app behind the proxy.

    python deploy/databricks/bundle.py --legacy DIR --out DIR [--command "uvicorn app:app"]
    make databricks-bundle LEGACY=DIR OUT=DIR

OUT gets the legacy app's files; `proxy/`, the package, run as `python -m proxy` from the app's
folder; `tts-cache-proxy.toml`, the preset; `app.yaml`, this folder's, with the legacy app's
command after "--" and its own env entries kept; and `requirements.txt`: the proxy's exact pins
and the legacy app's requirements, checked against each other. A conflict stops it, one line
each, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TEMPLATE = HERE / "app.yaml"
PRESET = HERE / "tts-cache-proxy.toml"
PINS = HERE / "requirements.txt"
PACKAGE = ROOT / "proxy"
PROXY_CONFIG = "tts-cache-proxy.toml"
APP_FILES = ("app.yaml", "app.yml")
# What the platform substitutes in a command: the proxy's port, so the legacy app gets its own.
PLATFORM_PORT = re.compile(r"\$\{?DATABRICKS_APP_PORT\}?")
BACKEND_PORT = "{backend_port}"
# Never copied from the legacy app's folder; and, at its top, what the bundle writes anew.
NOT_COPIED = frozenset({".git", "__pycache__", ".venv", "venv", ".databricks"})
WRITTEN = frozenset({*APP_FILES, "requirements.txt"})


class BundleError(Exception):
    """The bundle cannot be assembled; each line of `problems` says why."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Bundle:
    """What goes into OUT, and what the operator should know about it."""

    command: list[str]
    legacy_command: list[str]
    env: list[dict[str, Any]]
    requirements: str
    notes: list[str] = field(default_factory=list)


def normalize(name: str) -> str:
    """A project name as PyPI compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _not_copied(top: Path) -> Callable[[str, list[str]], set[str]]:
    """shutil.copytree's ignore: caches and VCS anywhere, the files written anew at the top."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name in NOT_COPIED or name.endswith(".pyc")}
        if Path(folder) == top:
            skipped |= WRITTEN & set(names)
        return skipped

    return ignore


def read_pins(text: str) -> dict[str, tuple[str, str]]:
    """The proxy's pins: {normalized name: (name, version)}."""
    pins: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            pins[normalize(name)] = (name, version)
    return pins


def merge_requirements(pins_text: str, legacy_text: str) -> tuple[str, list[str]]:
    """requirements.txt for both: the proxy's pins, then what the legacy app needs besides."""
    pins = read_pins(pins_text)
    extras: dict[str, set[str]] = {}
    kept: list[str] = []
    notes: list[str] = []
    problems: list[str] = []
    for raw in legacy_text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            kept.append(line)  # an option or a path: pip reads it, nothing here can check it
            notes.append(f"requirements: kept {line!r} as it is (not checked against the pins)")
            continue
        key = normalize(requirement.name)
        if key not in pins:
            kept.append(line)
            continue
        name, version = pins[key]
        if requirement.url or not requirement.specifier.contains(version, prereleases=True):
            problems.append(
                f"requirements: the legacy app asks for {line!r}, the proxy is tested with "
                f"{name}=={version} (change the legacy requirement, or the proxy's lock)"
            )
            continue
        extras.setdefault(key, set()).update(requirement.extras)
        notes.append(f"requirements: {line!r} is met by the proxy's {name}=={version}")
    if problems:
        raise BundleError(problems)
    lines = [
        "# The proxy's dependencies, exact (deploy/databricks/requirements.txt), then the legacy",
        "# app's own. Written by deploy/databricks/bundle.py.",
    ]
    for key, (name, version) in pins.items():
        wanted = sorted(extras.get(key, ()))
        lines.append(f"{name}{'[' + ','.join(wanted) + ']' if wanted else ''}=={version}")
    if kept:
        lines += ["", "# The legacy app's requirements.txt, less what the pins above meet."]
        lines += kept
    return "\n".join(lines) + "\n", notes


def read_app_yaml(folder: Path) -> dict[str, Any] | None:
    """The legacy app's app.yaml (or app.yml), parsed; None when it has none."""
    for name in APP_FILES:
        path = folder / name
        if path.is_file():
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise BundleError([f"{path}: expected a mapping with command and env"])
            return loaded
    return None


def proxy_prefix(template: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The template's command split at "--": the proxy's part, and the legacy app's default."""
    command = [str(part) for part in template["command"]]
    cut = command.index("--") + 1
    return command[:cut], command[cut:]


Env = list[dict[str, Any]]


def merge_env(legacy: Env, ours: Env) -> tuple[Env, list[str]]:
    """The legacy app's env entries first; ours where it has none of that name."""
    names = {str(entry.get("name")) for entry in legacy}
    notes = [
        f"env: {entry['name']} is the legacy app's own entry (the proxy reads the same)"
        for entry in ours
        if entry["name"] in names
    ]
    return legacy + [entry for entry in ours if entry["name"] not in names], notes


def plan(legacy: Path, command: str | None = None) -> Bundle:
    """What to write for the legacy app in `legacy`, or BundleError."""
    template = yaml.safe_load(TEMPLATE.read_text())
    prefix, default_command = proxy_prefix(template)
    app = read_app_yaml(legacy)
    notes: list[str] = []
    if command is not None:
        legacy_command = shlex.split(command)
    elif app is not None and app.get("command"):
        if not isinstance(app["command"], list):
            raise BundleError([f"{legacy}/app.yaml: command must be a list, as the platform wants"])
        legacy_command = [str(part) for part in app["command"]]
    else:
        legacy_command = default_command
        notes.append(
            f"command: the legacy app has no app.yaml command: `{shlex.join(default_command)}` "
            "is assumed (--command to change it)"
        )
    behind = [PLATFORM_PORT.sub(BACKEND_PORT, part) for part in legacy_command]
    if behind != legacy_command:
        notes.append(
            f"command: $DATABRICKS_APP_PORT (the proxy's port) became {BACKEND_PORT} "
            "(the legacy app's own) in its arguments"
        )
    legacy_env = (app or {}).get("env") or []
    if not isinstance(legacy_env, list) or not all(isinstance(e, dict) for e in legacy_env):
        raise BundleError([f"{legacy}/app.yaml: env must be a list of name/value entries"])
    env, env_notes = merge_env(legacy_env, list(template.get("env") or []))
    requirements_path = legacy / "requirements.txt"
    if requirements_path.is_file():
        legacy_requirements = requirements_path.read_text()
    elif (legacy / "pyproject.toml").is_file():
        raise BundleError(
            [
                f"{legacy} declares its dependencies in pyproject.toml only: the platform installs "
                "requirements.txt instead when there is one; write it first (e.g. `uv export "
                "--no-hashes --format requirements-txt > requirements.txt`)"
            ]
        )
    else:
        legacy_requirements = ""
    requirements, requirement_notes = merge_requirements(PINS.read_text(), legacy_requirements)
    return Bundle(
        command=prefix + behind,
        legacy_command=legacy_command,
        env=env,
        requirements=requirements,
        notes=notes + env_notes + requirement_notes,
    )


def render_app_yaml(bundle: Bundle) -> str:
    """app.yaml: the command on one line, the rollback on the next, then env."""
    text = (
        "# Written by deploy/databricks/bundle.py from deploy/databricks/app.yaml: the legacy\n"
        "# app behind TTS Cache Proxy. To roll back to the legacy app alone, with the same\n"
        "# resources, put the second command line in place of the first.\n"
        f"command: {json.dumps(bundle.command)}\n"
        f"# command: {json.dumps(bundle.legacy_command)}\n"
    )
    if bundle.env:
        text += yaml.safe_dump({"env": bundle.env}, sort_keys=False, default_flow_style=False)
    return text


def assemble(legacy: Path, out: Path, command: str | None = None) -> Bundle:
    """Write the app's folder `out` for the legacy app in `legacy`."""
    legacy, out = legacy.resolve(), out.resolve()
    problems = []
    if not legacy.is_dir():
        problems.append(f"--legacy {legacy}: not a folder")
    elif out == legacy or legacy in out.parents:
        problems.append(f"--out {out}: inside the legacy app's folder")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out}: exists and is not an empty folder")
    for taken in ("proxy", PROXY_CONFIG):
        if (legacy / taken).exists():
            problems.append(f"{legacy / taken}: the bundle's own {taken} would replace it")
    if problems:
        raise BundleError(problems)
    bundle = plan(legacy, command)
    shutil.copytree(legacy, out, ignore=_not_copied(legacy), dirs_exist_ok=True)
    shutil.copytree(PACKAGE, out / "proxy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(PRESET, out / PROXY_CONFIG)
    (out / "app.yaml").write_text(render_app_yaml(bundle))
    (out / "requirements.txt").write_text(bundle.requirements)
    return bundle


def main(argv: list[str] | None = None) -> int:
    """Assemble, print what was done; 1 with one line per problem."""
    parser = argparse.ArgumentParser(prog="deploy/databricks/bundle.py", description=__doc__)
    parser.add_argument("--legacy", required=True, type=Path, help="the legacy app's folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--command", help="the legacy app's command (default: its app.yaml's)")
    args = parser.parse_args(argv)
    try:
        bundle = assemble(args.legacy, args.out, args.command)
    except BundleError as exc:
        for problem in exc.problems:
            print(f"bundle: {problem}", file=sys.stderr)
        return 1
    for note in bundle.notes:
        print(f"bundle: {note}")
    print(f"bundle: {args.out} holds the app; its command: {shlex.join(bundle.command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
