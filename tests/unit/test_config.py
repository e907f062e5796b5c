"""Settings: defaults, the TOML file, the environment, and clear errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, all_keys, load_settings, redacted, to_toml

ROOT = Path(__file__).resolve().parents[2]


def flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def test_default_toml_names_every_key_with_its_default() -> None:
    documented = flatten(tomllib.loads((ROOT / "config/default.toml").read_text()))
    defaults = flatten(dataclasses.asdict(Settings()))
    assert set(documented) == set(all_keys())
    assert documented == defaults


def test_default_toml_comments_every_key() -> None:
    for line in (ROOT / "config/default.toml").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            assert "#" in line, f"no comment on: {line}"


@pytest.mark.parametrize("name", ["example.toml", "docker.toml"])
def test_shipped_examples_load(name: str) -> None:
    load_settings(ROOT / "config" / name, env={})


PRESET = ROOT / "deploy/databricks/tts-cache-proxy.toml"
# What Databricks Apps sets with the app.yaml of deploy/databricks and its two resources.
PLATFORM = {
    "DATABRICKS_APP_PORT": "8000",
    "DATABRICKS_VOLUME": "/Volumes/main/chat/tts",
    "PGHOST": "instance-1.database.cloud.databricks.com",
}


def test_the_databricks_preset_takes_what_the_platform_gives() -> None:
    sources: dict[str, str] = {}
    settings = load_settings(PRESET, env=PLATFORM, sources=sources)

    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8000)
    assert sources["server.port"] == "platform (DATABRICKS_APP_PORT)"
    volume = settings.cache.volume
    assert (volume.kind, volume.path, volume.prefix) == (
        "databricks",
        "/Volumes/main/chat/tts",
        "tts_audio",
    )
    assert sources["cache.volume.path"] == "environment (DATABRICKS_VOLUME)"
    # Every peer is the Apps gateway: any address is believed (the preset says so, and what
    # to change anywhere else).
    assert settings.identity.trusted_proxies == ["0.0.0.0/0", "::/0"]
    assert settings.upstream.command_env_unset == ["DATABRICKS_VOLUME"]
    index = settings.index
    assert (index.dsn, index.password_from) == ("", "databricks")
    assert index.verify_ownership and index.write_legacy_metadata
    assert volume.max_concurrent_calls < 10  # the workspace's Files API allows about 10


def test_the_databricks_preset_without_its_volume_stops_naming_it() -> None:
    without = {name: value for name, value in PLATFORM.items() if name != "DATABRICKS_VOLUME"}
    with pytest.raises(ConfigError) as raised:
        load_settings(PRESET, env=without)
    assert raised.value.key == "cache.volume.path"
    assert "DATABRICKS_VOLUME" in str(raised.value)


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 9000\n[cache.memory]\nmax_bytes = 10\n")
    settings = load_settings(
        path,
        env={
            "TTS_PROXY_CACHE_MEMORY_MAX_BYTES": "2048",
            "TTS_PROXY_TTS_SPEAK_PATHS": "/a, /b",
            "TTS_PROXY_SERVER_ACCESS_LOG": "false",
            "UNRELATED": "x",
        },
    )
    assert settings.server.port == 9000
    assert settings.cache.memory.max_bytes == 2048
    assert settings.tts.speak_paths == ["/a", "/b"]
    assert settings.server.access_log is False


def test_environment_list_as_json() -> None:
    settings = load_settings(env={"TTS_PROXY_IDENTITY_TRUSTED_PROXIES": '["10.0.0.0/8"]'})
    assert settings.identity.trusted_proxies == ["10.0.0.0/8"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "abc"\n', "server.port"),
        ('[server]\nport = "8081"\n', "server.port"),
        ('[server]\naccess_log = "true"\n', "server.access_log"),
        ('[server]\nshutdown_timeout_seconds = "3"\n', "server.shutdown_timeout_seconds"),
        ('[identity]\ntrusted_proxies = "10.0.0.0/8"\n', "identity.trusted_proxies"),
        ("[server]\nprot = 1\n", "server.prot"),
        ('[upstream]\nurl = "ftp://x"\n', "upstream.url"),
        ('[upstream]\nurl = "http://x:99999"\n', "upstream.url"),
        ('[upstream]\nkind = "grpc"\n', "upstream.kind"),
        ('[cache.volume]\nlookup_via_index = "yes"\n', "cache.volume.lookup_via_index"),
        ('[upstream]\ncommand_env_unset = ["PATH=/bin"]\n', "upstream.command_env_unset"),
        ("[cache.memory]\nmax_bytes = -1\n", "cache.memory.max_bytes"),
        ('[identity]\ntrusted_proxies = ["nope"]\n', "identity.trusted_proxies"),
        ("[server]\naccess_log = 1\n", "server.access_log"),
        ("server = 3\n", "server"),
        ("[tts]\nspeak_paths = []\n", "tts.speak_paths"),
        ("[fleet]\nconfirm_timeout_seconds = 0\n", "fleet.confirm_timeout_seconds"),
        ('[fleet]\nconfirm_timeout_seconds = "soon"\n', "fleet.confirm_timeout_seconds"),
        ("[fleet]\nowner_timeout_seconds = 0\n", "fleet.owner_timeout_seconds"),
        ("[fleet]\nwait_seconds = -1\n", "fleet.wait_seconds"),
        ('[fleet]\nreplica_fills = "on"\n', "fleet.replica_fills"),
        ("[fleet]\nworker_fills = 1\n", "fleet.worker_fills"),
        ("[nothing]\n", "nothing"),
        ("[server\n", "--config"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert caught.value.key == key
    assert str(caught.value).startswith(key)


def test_a_file_value_is_typed_but_the_same_text_from_the_environment_is_parsed() -> None:
    # TOML says what a value is; the environment has only text, so there it is parsed.
    settings = load_settings(
        env={
            "TTS_PROXY_SERVER_PORT": "8081",
            "TTS_PROXY_SERVER_ACCESS_LOG": "false",
            "TTS_PROXY_IDENTITY_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1/32",
        }
    )
    assert settings.server.port == 8081
    assert settings.server.access_log is False
    assert settings.identity.trusted_proxies == ["10.0.0.0/8", "127.0.0.1/32"]


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings("/nonexistent/config.toml", env={})


def test_bad_environment_value_and_unknown_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"TTS_PROXY_SERVER_PORT": "abc"})
    assert caught.value.key == "server.port"
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"TTS_PROXY_SERVER_PROT": "1"})
    assert caught.value.key == "TTS_PROXY_SERVER_PROT"


def test_redaction_hides_secrets() -> None:
    settings = load_settings(
        env={},
        overrides={
            "admin.token": "s3cret" * 6,
            "index.dsn": "postgresql://u:pw@h/db",
            "upstream.url": "http://user:pw@backend:8000",
        },
    )
    text = to_toml(redacted(settings))
    assert "s3cret" not in text and "pw" not in text
    assert 'token = "***"' in text
    assert "http://user:***@backend:8000" in text
    assert tomllib.loads(text)["server"]["port"] == 8080


def test_legacy_databricks_volume_variable(tmp_path: Path) -> None:
    settings = load_settings(env={"DATABRICKS_VOLUME": "/Volumes/main/chat/tts/"})
    assert settings.cache.volume.kind == "databricks"
    assert settings.cache.volume.path == "/Volumes/main/chat/tts"
    assert settings.cache.volume.prefix == "tts_audio"  # the legacy layout's folder
    path = tmp_path / "c.toml"
    path.write_text('[cache.volume]\nkind = "local"\npath = "/srv/v"\n')
    explicit = load_settings(path, env={"DATABRICKS_VOLUME": "/Volumes/main/chat/tts/"})
    assert explicit.cache.volume.kind == "local"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("index.schema", "Robert'); DROP TABLE x;--"),
        ("index.ownership_query", "SELECT 1"),
        ("cache.volume.failure_threshold", 0),
        ("cache.volume.retries", -1),
    ],
)
def test_index_and_volume_validation(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides={key: value})
    assert caught.value.key == key


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"upstream.max_streams": 200}, "upstream.max_streams"),  # none left for the rest
        ({"upstream.max_streams": 0}, "upstream.max_streams"),
        ({"upstream.slot_wait_seconds": 0}, "upstream.slot_wait_seconds"),
        ({"upstream.websocket_max_message_bytes": 0}, "upstream.websocket_max_message_bytes"),
        ({"server.body_idle_timeout_seconds": 0}, "server.body_idle_timeout_seconds"),
        ({"server.max_requests_per_client": -1}, "server.max_requests_per_client"),
        ({"tts.body_timeout_seconds": -5}, "tts.body_timeout_seconds"),
    ],
)
def test_resource_limits_validation(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, overrides=overrides)
    assert caught.value.key == key
    load_settings(env={}, overrides={"server.max_requests_per_client": 0})  # 0: no limit
