"""The settings as typed, frozen dataclasses, each key with its default; and ConfigError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(Exception):
    """A setting is wrong; `key` names it and the message says what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ServerSettings:
    """Where the proxy listens and how it stops."""

    host: str = "127.0.0.1"
    port: int = 8080
    shutdown_timeout_seconds: float = 30.0
    access_log: bool = True
    body_idle_timeout_seconds: float = 10.0
    max_requests_per_client: int = 32


@dataclass(frozen=True)
class UpstreamSettings:
    """The legacy backend and who synthesizes a speak miss."""

    url: str = "http://127.0.0.1:8000"
    kind: Literal["http", "replicate", "deepgram"] = "http"
    fallback: str = ""
    timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 5.0
    max_connections: int = 200
    max_streams: int = 100
    slot_wait_seconds: float = 5.0
    websocket_max_message_bytes: int = 16_777_216
    provider_timeout_seconds: float = 30.0
    replicate_base_url: str = "https://api.replicate.com"
    replicate_model: str = (
        "jaaari/kokoro-82m:f559560eb822dc509045f3921a1921234918b91739db4bf3daab2169b71c7a13"
    )
    deepgram_base_url: str = "https://api.deepgram.com"
    deepgram_encoding: str = "mp3"
    command: list[str] = field(default_factory=list)
    command_env_unset: list[str] = field(default_factory=list)
    start_timeout_seconds: float = 60.0
    stop_seconds: float = 14.0


@dataclass(frozen=True)
class RouteSettings:
    """One speak route of `[[tts.routes]]`: a path and the contract its JSON bodies follow.

    Unset (None) fields take the named contract's value (`proxy/contracts.py`); a field path
    set to "" means the body has no such field. Field paths are dotted (`options.voice`).
    """

    path: str
    contract: Literal["legacy", "openai", "custom"]
    scope: Literal["user", "shared"] = "user"
    identity: Literal["forwarded", "header", "none", "api-key"] | None = None
    save_by_default: bool | None = None
    text: str | None = None
    voice: str | None = None
    default_voice: str | None = None
    provider: str | None = None
    message_id: str | None = None
    thread_id: str | None = None
    save: str | None = None
    key_fields: list[str] | None = None
    key_defaults: dict[str, Any] | None = None
    ignore_fields: list[str] | None = None
    undeclared: Literal["bypass", "ignore"] | None = None
    strip_text: bool | None = None


@dataclass(frozen=True)
class TtsSettings:
    """The speak routes and what their bodies may hold."""

    speak_paths: list[str] = field(default_factory=lambda: ["/api/tts/speak"])
    max_body_bytes: int = 1_048_576
    body_timeout_seconds: float = 30.0
    default_voice: str = "af_nicole"
    forward_save_to_volume: bool = False
    save_by_default: bool = False
    clean_text: Literal["none", "basic"] = "basic"
    routes: list[RouteSettings] = field(default_factory=list)


@dataclass(frozen=True)
class IdentitySettings:
    """Who is asking, and whom to believe."""

    mode: Literal["forwarded", "header", "none", "api-key"] = "forwarded"
    user_header: str = "X-Forwarded-Email"
    token_header: str = "X-Forwarded-Access-Token"
    # The key of the HMAC that turns a bearer API key into a user (identity "api-key").
    api_key_secret: str = ""
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Headers a gateway sets about the caller: dropped when the peer is not a trusted proxy
    # (the user and token headers always are), and never removed because Connection names them.
    untrusted_drop: list[str] = field(
        default_factory=lambda: [
            "X-Forwarded-User",
            "X-Forwarded-Preferred-Username",
            "X-Real-Ip",
            "Forwarded",
            "X-Forwarded-Proto",
            "X-Forwarded-Host",
        ]
    )


@dataclass(frozen=True)
class MemorySettings:
    """The in-process LRU tier."""

    max_bytes: int = 268_435_456
    ttl_seconds: float = 86_400.0


@dataclass(frozen=True)
class VolumeSettings:
    """The durable tier."""

    kind: Literal["local", "databricks", "none"] = "local"
    path: str = "var/volume"
    prefix: str = "tts_audio"
    timeout_seconds: float = 10.0
    lookup_budget_ms: int = 500
    verify_max_bytes: int = 16_777_216
    auth: Literal["app", "user"] = "app"
    retries: int = 2
    failure_threshold: int = 5
    cooldown_seconds: float = 30.0
    # This replica's share of the workspace's Files API budget (about 10 concurrent, 100/s).
    max_concurrent_calls: int = 8
    max_calls_per_second: float = 80.0
    # With the PostgreSQL index: ask it whether a key is stored before the Files API (a miss then
    # costs no call). when-complete: trust its "not stored" once a walk has recorded the Volume.
    lookup_via_index: Literal["when-complete", "always", "off"] = "when-complete"
    max_bytes: int = 0
    ttl_seconds: float = 0.0
    user_max_bytes: int = 0
    min_free_bytes: int = 536_870_912


@dataclass(frozen=True)
class CacheSettings:
    """Both tiers and what may enter them."""

    max_entry_bytes: int = 16_777_216
    max_text_chars: int = 5_000
    min_uses: int = 1
    janitor_interval_seconds: float = 300.0
    janitor_batch_size: int = 500
    memory: MemorySettings = field(default_factory=MemorySettings)
    volume: VolumeSettings = field(default_factory=VolumeSettings)


@dataclass(frozen=True)
class IndexSettings:
    """The optional PostgreSQL index."""

    dsn: str = ""
    password: str = ""
    password_from: Literal["config", "databricks"] = "config"
    schema: str = "tts_cache"
    timeout_seconds: float = 2.0
    pool_max_size: int = 10
    prepared_statements: bool = True
    verify_ownership: bool = False
    ownership_cache_seconds: float = 30.0
    ownership_query: str = "SELECT 1 FROM chat_messages WHERE message_id = $1 AND user_id = $2"
    write_legacy_metadata: bool = False


@dataclass(frozen=True)
class AdminSettings:
    """The admin API and pages."""

    token: str = ""
    # Networks the admin pages and API answer; empty = any (the token still guards them).
    allowed_networks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FleetSettings:
    """What crosses processes: the workers of one `serve` and the replicas on one index."""

    # How long a purge waits for the other processes to confirm they dropped it.
    confirm_timeout_seconds: float = 2.0
    # One fill per key across the workers of a `serve --workers N`: the key's owner leads it.
    worker_fills: bool = True
    # How long a worker waits for the owner to take its miss (or to show it is alive while the
    # fill runs) before it fills the key itself.
    owner_timeout_seconds: float = 1.0
    # One fill per key across replicas (with the index and a Volume): a lease in PostgreSQL.
    replica_fills: bool = True
    # How long a replica waits for another replica's fill of the key before it fills it itself.
    wait_seconds: float = 15.0


@dataclass(frozen=True)
class Settings:
    """Every setting of the proxy."""

    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    tts: TtsSettings = field(default_factory=TtsSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
