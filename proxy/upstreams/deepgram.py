"""Deepgram's Aura as an upstream: `POST /v1/speak` through the SDK, streamed as it comes."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Final

from proxy.config import UpstreamSettings
from proxy.upstreams.base import SpeakCall
from proxy.upstreams.providers import (
    MissingCredential,
    ProviderError,
    ProviderResponse,
    audio_headers,
    redact,
)

try:
    import httpx
    from deepgram import AsyncDeepgramClient
    from deepgram.core.api_error import ApiError
    from deepgram.environment import DeepgramClientEnvironment
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "upstream.kind = 'deepgram' needs the deepgram-sdk package: "
        "pip install 'deepgram-sdk>=3,<8'"
    ) from exc

KEY_VARIABLE: Final = "DEEPGRAM_API_KEY"
FALLBACK_VOICE: Final = "aura-2-thalia-en"
# Deepgram's container table: WAV wraps the PCM encodings, Ogg wraps Opus; the others take none.
CONTAINERS: Final = {"linear16": "wav", "mulaw": "wav", "alaw": "wav", "opus": "ogg"}
CONTENT_TYPES: Final = {
    "mp3": "audio/mpeg",
    "linear16": "audio/wav",
    "mulaw": "audio/wav",
    "alaw": "audio/wav",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}


def deepgram_model(voice: str, fallback: str = FALLBACK_VOICE) -> str:
    """The Aura model for `voice`: itself when it is an Aura voice, else the fallback voice."""
    return voice if voice.startswith("aura-") else fallback


class DeepgramUpstream:
    """Aura on Deepgram, through deepgram-sdk's async client, streamed as it is synthesized."""

    name: Final[str] = "deepgram"

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        api_key: str | None = None,
        fallback_voice: str = FALLBACK_VOICE,
    ) -> None:
        key = (api_key if api_key is not None else os.environ.get(KEY_VARIABLE, "")).strip()
        if not key:
            raise MissingCredential(
                "upstream.kind", self.name, f"'deepgram' needs {KEY_VARIABLE} in the environment"
            )
        self.secrets: tuple[str, ...] = (key,)
        self._encoding = settings.deepgram_encoding
        self._container = CONTAINERS.get(self._encoding)
        self._fallback_voice = fallback_voice
        base = settings.deepgram_base_url.rstrip("/")
        environment = DeepgramClientEnvironment(
            base=base, production=_websocket_url(base), agent=_websocket_url(base), agent_rest=base
        )
        timeout = httpx.Timeout(
            settings.provider_timeout_seconds, connect=settings.connect_timeout_seconds
        )
        # Owned here, so aclose() can release its pool; the SDK would otherwise make its own.
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self._client = AsyncDeepgramClient(
            api_key=key,
            environment=environment,
            httpx_client=self._http,
            timeout=settings.provider_timeout_seconds,
            max_retries=0,
        )

    async def open(self, call: SpeakCall) -> ProviderResponse:
        """Ask Aura for the call's text; the response streams its chunks as they arrive."""
        model = deepgram_model(call.speak.voice, self._fallback_voice)
        stack = contextlib.AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                self._client.speak.v1.audio.with_raw_response.generate(
                    text=call.speak.text,
                    model=model,
                    encoding=self._encoding,
                    container=self._container,
                    request_options={
                        # Identity, so Content-Length counts the bytes the cache will hold.
                        "additional_headers": {"Accept-Encoding": "identity"},
                        "max_retries": 0,
                    },
                )
            )
        except Exception as exc:
            await stack.aclose()
            raise self._error(exc) from None
        headers = _lower(response.headers)
        content_type = headers.get("content-type", "")
        if not content_type.lower().startswith("audio/"):
            content_type = CONTENT_TYPES.get(self._encoding, "application/octet-stream")
        identity = headers.get("content-encoding", "identity").lower() == "identity"
        length = headers.get("content-length") if identity else None
        return ProviderResponse(
            self.name,
            audio_headers(self.name, content_type, model, length),
            response.data,
            aclose=stack.aclose,
            secrets=self.secrets,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _error(self, exc: Exception) -> ProviderError:
        """A ProviderError for an SDK or transport failure, with nothing secret in it."""
        if isinstance(exc, ApiError):
            said = _api_message(exc.body)
            detail = f"HTTP {exc.status_code}: {said}" if said else f"HTTP {exc.status_code}"
            return ProviderError(self.name, 502, redact(detail, self.secrets))
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return ProviderError(self.name, 504, "timed out")
        if isinstance(exc, httpx.HTTPError):
            return ProviderError(self.name, 502, f"connection failed ({type(exc).__name__})")
        return ProviderError(self.name, 502, f"failed ({type(exc).__name__})")


def _api_message(body: Any) -> str:
    """Deepgram's own words from an error body (`err_msg`), whatever its shape."""
    if isinstance(body, dict):
        for field in ("err_msg", "message", "detail", "error", "reason"):
            value = body.get(field)
            if isinstance(value, str) and value:
                return value
        return ""
    return str(body or "")[:200]


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _websocket_url(base: str) -> str:
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :]
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :]
    return base
