"""TTS providers as upstreams: the fallback chain, its errors, what a provider answers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from aiohttp import hdrs
from multidict import CIMultiDict

from proxy.config import ConfigError
from proxy.headers import X_TTS_FALLBACK, X_TTS_PROVIDER, X_TTS_VOICE
from proxy.upstreams.base import SpeakCall, UpstreamError, UpstreamResponse
from proxy.upstreams.clean import clean_text

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MAX_DETAIL_CHARS: Final = 300
CLEAN_INLINE_CHARS: Final = 16_384
REDACTED: Final = "***"

# Replicate tokens, and any credential after an auth scheme (a digit tells a key from a word).
_CREDENTIAL_PATTERNS: Final = (
    re.compile(r"r8_[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?i)\b(?:bearer|token|basic)\s+(?=[A-Za-z0-9._~+/=-]*\d)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\s\"',})\]]+(?:\s+[^\s\"',})\]]+)?"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without any configured secret nor anything shaped like a token or key."""
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern in _CREDENTIAL_PATTERNS:
        text = pattern.sub(_redacted_match, text)
    return text


def _redacted_match(match: re.Match[str]) -> str:
    # A pattern's one group is the label to keep ("Authorization: "), never the credential.
    return (match.group(1) if match.re.groups else "") + REDACTED


class ProviderError(UpstreamError):
    """A provider failed; `detail` is safe to show (redacted, bounded, no user text)."""

    def __init__(self, provider: str, status: int, detail: str) -> None:
        super().__init__(status, detail[:MAX_DETAIL_CHARS])
        self.provider = provider


class AllProvidersFailed(UpstreamError):
    """Every configured provider failed: the client gets 503 and each provider's error."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        super().__init__(503, "TTS failed with all providers: " + "; ".join(self.errors))

    def body(self) -> dict[str, str]:
        """The JSON body the legacy backend sent for the same failure."""
        return {"detail": self.detail}


class MissingCredential(ConfigError):
    """A configured provider has no credential (or no SDK) in this environment."""

    def __init__(self, key: str, provider: str, problem: str) -> None:
        super().__init__(key, problem)
        self.provider = provider


class Provider(Protocol):
    """One TTS provider: opens a stream of audio for a speak call."""

    @property
    def name(self) -> str:
        """The provider's name, as requests and `X-TTS-Provider` spell it."""
        ...

    @property
    def secrets(self) -> tuple[str, ...]:
        """Credentials that must never appear in an error or a log."""
        ...

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """Start synthesis; raises ProviderError when no audio can be had."""
        ...

    async def aclose(self) -> None:
        """Release the provider's connections."""
        ...


# Background closes of streams abandoned before their end; kept so they are not collected early.
_closing: set[asyncio.Task[None]] = set()


class ProviderResponse:
    """A provider's audio as an UpstreamResponse: headers known, body streamed as it arrives."""

    def __init__(
        self,
        provider: str,
        headers: CIMultiDict[str],
        chunks: AsyncIterator[bytes],
        *,
        aclose: Callable[[], Awaitable[None]],
        secrets: Iterable[str] = (),
    ) -> None:
        self.status = 200
        self.reason: str | None = "OK"
        self.headers = headers
        self.upstream_seconds: float | None = None  # not timed: the access log shows none
        self._provider = provider
        self._chunks = chunks
        self._aclose = aclose
        self._secrets = tuple(secrets)
        self._closed = False

    def read_buffered(self) -> bytes:
        """Nothing: a provider's audio all comes through iter_chunks."""
        return b""

    def body_complete(self) -> bool:
        """False: the audio comes through iter_chunks."""
        return False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The audio as it arrives; raises ProviderError when the stream breaks."""
        try:
            async for chunk in self._chunks:
                if chunk:
                    yield chunk
        except UpstreamError:
            raise
        except Exception as exc:
            raise ProviderError(self._provider, 502, stream_broken(exc, self._secrets)) from None
        finally:
            await self._release()

    def close(self) -> None:
        """Stop reading and release the connection (in the background when still open)."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._release())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._aclose()


def stream_broken(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """What to say about a body that stopped early."""
    if isinstance(exc, TimeoutError):
        return "audio stream stalled"
    return redact(f"audio stream broke ({type(exc).__name__})", secrets)


def audio_headers(
    provider: str, content_type: str, voice: str, length: str | None = None
) -> CIMultiDict[str]:
    """The headers of a provider's audio, as the legacy backend sent them."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers[hdrs.CONTENT_TYPE] = content_type
    if length is not None and length.isdigit():
        headers[hdrs.CONTENT_LENGTH] = length
    headers[hdrs.CACHE_CONTROL] = "no-cache"
    headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = "*"
    headers[X_TTS_PROVIDER] = provider
    headers[X_TTS_VOICE] = voice
    return headers


class ProviderChain:
    """The configured providers in order: the first to produce an audio byte answers."""

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        timeout_seconds: float,
        clean: Callable[[str], str] | None = clean_text,
    ) -> None:
        if not providers:
            raise ValueError("a provider chain needs at least one provider")
        self.providers = tuple(providers)
        self._timeout = timeout_seconds
        self._clean = clean

    @property
    def names(self) -> tuple[str, ...]:
        """The providers' names, in the order they are tried by default."""
        return tuple(p.name for p in self.providers)

    async def open(self, call: SpeakCall) -> UpstreamResponse:
        """Try each provider until one yields audio; AllProvidersFailed (503) when none does."""
        text = await self._speakable(call.speak.text)
        if not text:
            raise UpstreamError(400, "Text has nothing to speak")
        speaking = dataclasses.replace(call, speak=call.speak._replace(text=text))
        secrets = [s for p in self.providers for s in p.secrets] + [call.speak.text, text]
        errors: list[str] = []
        for attempt, provider in enumerate(self._order(call.speak.provider)):
            try:
                response = await self._attempt(provider, speaking)
            except UpstreamError as exc:
                detail = redact(exc.detail, secrets)
                errors.append(f"{provider.name}: {detail}")
                log.warning("tts provider %s failed before any audio: %s", provider.name, detail)
                continue
            except Exception as exc:
                # An SDK's surprise: its message might carry anything, so only its type is told.
                errors.append(f"{provider.name}: failed ({type(exc).__name__})")
                log.warning("tts provider %s failed: %s", provider.name, type(exc).__name__)
                continue
            substituted = _substitutions(response, call, first=attempt == 0)
            if substituted:
                response.headers[X_TTS_FALLBACK] = ", ".join(substituted)
                log.debug("tts provider %s answered with a %s", provider.name, substituted)
            return response
        raise AllProvidersFailed(errors)

    async def aclose(self) -> None:
        """Release every provider's connections."""
        for provider in self.providers:
            await provider.aclose()

    async def _speakable(self, text: str) -> str:
        if self._clean is None:
            return text.strip()
        if len(text) > CLEAN_INLINE_CHARS:
            # Long messages are cleaned off the event loop, which serves every other request.
            return await asyncio.to_thread(self._clean, text)
        return self._clean(text)

    def _order(self, requested: str | None) -> list[Provider]:
        # The legacy backend tried the provider the client picked first; so does the chain,
        # when that provider is configured, and the cache then stores what the client asked for.
        ordered = list(self.providers)
        for index, provider in enumerate(ordered):
            if provider.name == requested and index > 0:
                ordered.insert(0, ordered.pop(index))
        return ordered

    async def _attempt(self, provider: Provider, call: SpeakCall) -> PrimedResponse:
        """Open `provider` and read its first audio byte within the timeout."""
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(self._timeout):
                response = await provider.open(call)
                if response.status != 200:
                    raise ProviderError(provider.name, 502, f"HTTP {response.status}")
                chunks = aiter(response.iter_chunks())
                first = b""
                while not first:
                    first = await anext(chunks)
        except TimeoutError:
            _close(response)
            raise ProviderError(provider.name, 504, f"timed out after {self._timeout:g}s") from None
        except StopAsyncIteration:
            _close(response)
            raise ProviderError(provider.name, 502, "returned no audio") from None
        except BaseException:
            _close(response)
            raise
        return PrimedResponse(response, first, chunks)


class PrimedResponse:
    """A response whose first chunk was read already (to know the provider works)."""

    def __init__(self, inner: UpstreamResponse, first: bytes, rest: AsyncIterator[bytes]) -> None:
        self.status = inner.status
        self.reason = inner.reason
        self.headers: CIMultiDict[str] = CIMultiDict(inner.headers)
        self.upstream_seconds = inner.upstream_seconds
        self._inner = inner
        self._first = first
        self._rest = rest

    def read_buffered(self) -> bytes:
        """Nothing: the first chunk, read already, comes first from iter_chunks."""
        return b""

    def body_complete(self) -> bool:
        """False: the first chunk and the rest come through iter_chunks."""
        return False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The first chunk, then the rest as it arrives."""
        yield self._first
        async for chunk in self._rest:
            yield chunk

    def close(self) -> None:
        """Release the provider's stream."""
        self._inner.close()


def _close(response: UpstreamResponse | None) -> None:
    if response is not None:
        response.close()


def _substitutions(response: UpstreamResponse, call: SpeakCall, *, first: bool) -> list[str]:
    """What differs from the request: the provider, the voice, or both."""
    found: list[str] = []
    used = response.headers.get(X_TTS_PROVIDER, "").lower()
    if not first or (call.speak.provider is not None and used != call.speak.provider):
        found.append("provider")
    voice = response.headers.get(X_TTS_VOICE)
    if voice is not None and voice != call.speak.voice:
        found.append("voice")
    return found


__all__ = [
    "AllProvidersFailed",
    "MissingCredential",
    "PrimedResponse",
    "Provider",
    "ProviderChain",
    "ProviderError",
    "ProviderResponse",
    "audio_headers",
    "redact",
]
