"""Replicate's Kokoro-82M as an upstream: one prediction, then its audio file streamed."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes, urlsplit

import aiohttp
from aiohttp import hdrs

from proxy.config import ConfigError, UpstreamSettings
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
    from replicate.client import Client
    from replicate.exceptions import ReplicateError
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "upstream.kind = 'replicate' needs the replicate package: pip install 'replicate>=1,<2'"
    ) from exc

log = logging.getLogger(__name__)

TOKEN_VARIABLE: Final = "REPLICATE_API_TOKEN"
FALLBACK_VOICE: Final = "af_nicole"
SPEED: Final = 1.0
DEFAULT_CONTENT_TYPE: Final = "audio/wav"
_BY_SUFFIX: Final = {
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".aac": "audio/aac",
    ".m4a": "audio/mp4",
}
# Content types that say nothing about the bytes: the file name decides then.
_UNTYPED: Final = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_TERMINAL: Final = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True, slots=True)
class ModelRef:
    """`owner/name` or `owner/name:version`, as the legacy backend pinned Kokoro-82M."""

    owner: str
    name: str
    version: str | None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        """Split a model reference; ValueError when it is not one."""
        path, _, version = ref.strip().partition(":")
        owner, _, name = path.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"not a Replicate model reference: {ref!r}")
        return cls(owner, name, version or None)


class ReplicateUpstream:
    """Kokoro-82M on Replicate: a prediction with `Prefer: wait`, then the file as it downloads."""

    name: Final[str] = "replicate"

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        *,
        api_token: str | None = None,
        fallback_voice: str = FALLBACK_VOICE,
        poll_interval: float = 0.5,
    ) -> None:
        token = (api_token if api_token is not None else os.environ.get(TOKEN_VARIABLE, "")).strip()
        if not token:
            raise MissingCredential(
                "upstream.kind", self.name, f"'replicate' needs {TOKEN_VARIABLE} in the environment"
            )
        self.secrets: tuple[str, ...] = (token,)
        try:
            self._model = ModelRef.parse(settings.replicate_model)
        except ValueError as exc:
            raise ConfigError("upstream.replicate_model", str(exc)) from None
        self._fallback_voice = fallback_voice
        self._timeout = settings.provider_timeout_seconds
        self._connect_timeout = settings.connect_timeout_seconds
        self._session = session
        # Owned here, so aclose() can release the pool the SDK's httpx client keeps.
        self._transport = httpx.AsyncHTTPTransport()
        self._client = Client(
            api_token=token,
            base_url=settings.replicate_base_url.rstrip("/"),
            timeout=httpx.Timeout(self._timeout, connect=self._connect_timeout),
            transport=self._transport,
        )
        self._client.poll_interval = poll_interval
        self._cancels: set[asyncio.Task[None]] = set()

    async def open(self, call: SpeakCall) -> ProviderResponse:
        """Run the model for the call's text and voice; stream the file it outputs."""
        voice = kokoro_voice(call.speak.voice, self._fallback_voice)
        output = await self._predict(call.speak.text, voice)
        url = output_url(output)
        if url is None:
            raise ProviderError(self.name, 502, "returned no output")
        if url.startswith("data:"):
            return self._inline(url, voice)
        return await self._download(url, voice)

    async def aclose(self) -> None:
        """Let pending cancellations finish briefly, then close the connection pool."""
        if self._cancels:
            await asyncio.wait(self._cancels, timeout=self._connect_timeout)
        await self._transport.aclose()

    async def _predict(self, text: str, voice: str) -> object:
        """The output of a finished prediction; ProviderError for anything else."""
        inputs = {"text": text, "voice": voice, "speed": SPEED}
        # Prefer: wait=N holds the request until the output is ready (1 to 60 seconds).
        wait = max(1, min(60, math.ceil(self._timeout)))
        predictions = self._client.predictions
        try:
            if self._model.version is not None:
                prediction = await predictions.async_create(
                    version=self._model.version, input=inputs, wait=wait
                )
            else:
                prediction = await self._client.models.predictions.async_create(
                    model=(self._model.owner, self._model.name), input=inputs, wait=wait
                )
        except Exception as exc:
            raise self._error(exc) from None
        try:
            if prediction.status not in _TERMINAL:
                await prediction.async_wait()
        except asyncio.CancelledError:
            # Nobody will read the output: stop paying for it.
            self._cancel_later(prediction.id)
            raise
        except Exception as exc:
            self._cancel_later(prediction.id)
            raise self._error(exc) from None
        if prediction.status != "succeeded":
            reason = f": {prediction.error}" if prediction.error else ""
            detail = redact(f"prediction {prediction.status}{reason}", self.secrets)
            raise ProviderError(self.name, 502, detail)
        output: object = prediction.output
        return output

    async def _download(self, url: str, voice: str) -> ProviderResponse:
        """GET the output file without the API token; the body streams as it arrives."""
        if urlsplit(url).scheme not in {"http", "https"}:
            raise ProviderError(self.name, 502, "output is not a URL")
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._timeout
        )
        try:
            response = await self._session.get(
                url,
                # Identity, so Content-Length counts the bytes the cache will hold.
                headers={hdrs.ACCEPT: "audio/*, */*;q=0.5", hdrs.ACCEPT_ENCODING: "identity"},
                timeout=timeout,
            )
        except TimeoutError:
            raise ProviderError(self.name, 504, "output download timed out") from None
        except aiohttp.ClientError as exc:
            raise ProviderError(
                self.name, 502, f"output download failed ({type(exc).__name__})"
            ) from None
        if response.status != 200:
            response.release()
            raise ProviderError(self.name, 502, f"output download failed: HTTP {response.status}")
        content_type = _content_type(response.headers.get(hdrs.CONTENT_TYPE, ""), url)
        encoding = response.headers.get(hdrs.CONTENT_ENCODING, "identity").lower()
        if content_type is None or encoding != "identity":
            response.release()
            raise ProviderError(self.name, 502, "output is not audio")
        headers = audio_headers(
            self.name, content_type, voice, response.headers.get(hdrs.CONTENT_LENGTH)
        )

        async def close() -> None:
            # A body read to its end keeps the connection; one left half-read drops it.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

        return ProviderResponse(
            self.name, headers, _body(response), aclose=close, secrets=self.secrets
        )

    def _inline(self, url: str, voice: str) -> ProviderResponse:
        """A `data:` output, decoded: there is nothing to download."""
        header, _, payload = url[5:].partition(",")
        media_type, *params = header.split(";")
        try:
            if "base64" in params:
                audio = base64.b64decode(payload, validate=True)
            else:
                audio = unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ProviderError(self.name, 502, "output is not valid data") from None
        content_type = _content_type(media_type, "")
        if content_type is None:
            raise ProviderError(self.name, 502, "output is not audio")
        headers = audio_headers(self.name, content_type, voice, str(len(audio)))

        async def nothing() -> None:
            return None

        return ProviderResponse(self.name, headers, _once(audio), aclose=nothing)

    def _error(self, exc: Exception) -> ProviderError:
        """A ProviderError for an SDK or transport failure, with nothing secret in it."""
        if isinstance(exc, ReplicateError):
            status = exc.status or 0
            said = exc.detail or exc.title or ""
            detail = f"HTTP {status}: {said}" if said else f"HTTP {status}"
            return ProviderError(self.name, 502, redact(detail, self.secrets))
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return ProviderError(self.name, 504, "timed out")
        if isinstance(exc, httpx.HTTPError):
            return ProviderError(self.name, 502, f"connection failed ({type(exc).__name__})")
        return ProviderError(self.name, 502, f"failed ({type(exc).__name__})")

    def _cancel_later(self, prediction_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(prediction_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, prediction_id: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout):
                await self._client.predictions.async_cancel(prediction_id)
                log.debug("replicate prediction canceled after its caller gave up")


def kokoro_voice(voice: str, fallback: str = FALLBACK_VOICE) -> str:
    """The Kokoro voice for `voice`: itself, unless it is one of Deepgram's Aura voices."""
    return fallback if voice.startswith("aura-") else voice


def output_url(output: object) -> str | None:
    """The audio file URL in a prediction's output (a URL, or a list whose first item is one)."""
    if isinstance(output, list | tuple):
        output = next((item for item in output if isinstance(item, str) and item), None)
    return output if isinstance(output, str) and output.strip() else None


def _content_type(declared: str, url: str) -> str | None:
    """The audio type: as declared, else from the file name; None when it is not audio."""
    media = declared.split(";")[0].strip().lower()
    if media.startswith("audio/"):
        return declared.strip()
    if media not in _UNTYPED:
        return None
    path = urlsplit(url).path.lower()
    for suffix, content_type in _BY_SUFFIX.items():
        if path.endswith(suffix):
            return content_type
    return DEFAULT_CONTENT_TYPE


async def _body(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_any():
        yield chunk


async def _once(audio: bytes) -> AsyncIterator[bytes]:
    yield audio
