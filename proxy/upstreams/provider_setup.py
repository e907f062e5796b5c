"""The providers the configuration names: their credentials and SDKs checked, their chain built."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from proxy.config import Settings, UpstreamSettings
from proxy.upstreams.clean import clean_text
from proxy.upstreams.providers import MissingCredential, Provider, ProviderChain

if TYPE_CHECKING:
    import aiohttp

CREDENTIALS: Final = {"replicate": "REPLICATE_API_TOKEN", "deepgram": "DEEPGRAM_API_KEY"}
PACKAGES: Final = {"replicate": "replicate>=1,<2", "deepgram": "deepgram-sdk>=3,<8"}


def check_credentials(settings: UpstreamSettings, environ: Mapping[str, str] | None = None) -> None:
    """Raise MissingCredential when a configured provider lacks its SDK or its credential."""
    if settings.kind == "http":
        # The legacy backend synthesizes; a fallback provider is never used then.
        return
    environ = os.environ if environ is None else environ
    for key, name in (("upstream.kind", settings.kind), ("upstream.fallback", settings.fallback)):
        if name not in CREDENTIALS:
            continue
        variable = CREDENTIALS[name]
        if not environ.get(variable, "").strip():
            raise MissingCredential(key, name, f"{name!r} needs {variable} set in the environment")
        try:
            _import_provider(name)
        except ImportError:
            raise MissingCredential(
                key,
                name,
                f"{name!r} needs the {PACKAGES[name].split('>')[0]} package: "
                f"pip install '{PACKAGES[name]}'",
            ) from None


def build_synthesizer(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    environ: Mapping[str, str] | None = None,
) -> ProviderChain | None:
    """The provider chain for upstream.kind replicate or deepgram; None for http (the backend)."""
    upstream = settings.upstream
    if upstream.kind == "http":
        return None
    check_credentials(upstream, environ)
    environ = os.environ if environ is None else environ
    names = [upstream.kind] + ([upstream.fallback] if upstream.fallback else [])
    providers: list[Provider] = []
    for name in names:
        credential = environ[CREDENTIALS[name]].strip()
        if name == "replicate":
            from proxy.upstreams.replicate import ReplicateUpstream

            # A Deepgram voice means nothing to Kokoro: the configured default speaks instead.
            voice = settings.tts.default_voice
            kokoro = voice if not voice.startswith("aura-") else "af_nicole"
            providers.append(
                ReplicateUpstream(upstream, session, api_token=credential, fallback_voice=kokoro)
            )
        else:
            from proxy.upstreams.deepgram import DeepgramUpstream

            providers.append(DeepgramUpstream(upstream, api_key=credential))
    clean = clean_text if settings.tts.clean_text == "basic" else None
    return ProviderChain(providers, timeout_seconds=upstream.provider_timeout_seconds, clean=clean)


def _import_provider(name: str) -> None:
    # The SDKs are optional: importing the provider module is what tells whether one is there.
    importlib.import_module(f"proxy.upstreams.{name}")
