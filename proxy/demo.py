"""The bundled offline demo backend: the legacy `/api/tts/speak` contract with real audio.

`make run` starts it behind the proxy so the whole flow works without Replicate, Deepgram or a
network. It speaks with `espeak-ng` when that binary is on PATH, and otherwise with a deterministic
synthesized waveform (one formant-ish blip per word), so the same (text, voice) always gives the
same bytes. The audio is `audio/wav`, not the legacy `audio/mpeg`: there is no MP3 encoder offline.
The demo never caches (`X-TTS-Cache: disabled`); caching is the proxy's job.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import io
import json
import logging
import math
import shutil
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.demo_page import INDEX_HTML

logger = logging.getLogger(__name__)

SAMPLE_RATE: Final = 22_050
WORD_SECONDS: Final = 0.25
MAX_SECONDS: Final = 30.0
MAX_WORDS: Final = int(MAX_SECONDS / WORD_SECONDS)
CHUNK_BYTES: Final = 8192
MAX_BODY_BYTES: Final = 1_048_576
ESPEAK_TIMEOUT_SECONDS: Final = 10.0
DEFAULT_VOICE: Final = "af_nicole"
AUDIO_CONTENT_TYPE: Final = "audio/wav"

# The part of each word's slot that sounds; the rest is the pause between words.
_TONE_SECONDS: Final = 0.2
_ATTACK_SECONDS: Final = 0.01
_RELEASE_SECONDS: Final = 0.05


@dataclass
class DemoStats:
    """Counters a test or a benchmark reads to see how often the backend was really called."""

    speak_calls: int = 0


@dataclass(frozen=True)
class _Engine:
    latency_seconds: float
    espeak_path: str | None


DEMO_STATS_KEY: Final = web.AppKey("demo_stats", DemoStats)
_ENGINE_KEY: Final = web.AppKey("demo_engine", _Engine)


def get_demo_stats(app: web.Application) -> DemoStats:
    """The call counters of an app built by `create_demo_app`."""
    try:
        return app[DEMO_STATS_KEY]
    except KeyError:
        raise RuntimeError("not a demo backend app: build it with create_demo_app()") from None


def create_demo_app(
    *, latency_seconds: float = 0.0, use_espeak: bool | None = None
) -> web.Application:
    """The demo legacy backend; `use_espeak` None means use espeak-ng when it is on PATH."""
    if latency_seconds < 0:
        raise ValueError(f"latency_seconds must be 0 or more, got {latency_seconds}")
    espeak_path = shutil.which("espeak-ng") if use_espeak is not False else None
    if use_espeak and espeak_path is None:
        raise ValueError("use_espeak=True but espeak-ng is not on PATH")
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_legacy_errors])
    app[DEMO_STATS_KEY] = DemoStats()
    app[_ENGINE_KEY] = _Engine(latency_seconds=latency_seconds, espeak_path=espeak_path)
    app.router.add_get("/", _index)
    app.router.add_get("/health", _health)
    app.router.add_post("/api/tts/speak", _speak)
    app.router.add_get("/api/tts/stats", _stats)
    app.router.add_get("/api/events", _events)
    return app


# --- synthesis -------------------------------------------------------------------------------


def synthesize(text: str, voice: str) -> tuple[bytes, str]:
    """A deterministic 16-bit mono WAV for `text` in `voice`: one blip per word, 0.25 s each."""
    words = text.split()[:MAX_WORDS]
    samples = array.array("h")
    slot = round(WORD_SECONDS * SAMPLE_RATE)
    if not words:
        samples.extend([0] * slot)
    base_pitch = _base_pitch(voice)
    for word in words:
        samples.extend(_word_blip(word, voice, base_pitch))
        samples.extend([0] * (slot - round(_TONE_SECONDS * SAMPLE_RATE)))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(SAMPLE_RATE)
        # array("h") is native order, which is what wave expects (it swaps on big-endian hosts).
        writer.writeframes(samples.tobytes())
    return buffer.getvalue(), AUDIO_CONTENT_TYPE


def _base_pitch(voice: str) -> float:
    # Kokoro names carry the speaker's sex in the second letter (af_, bm_): keep it audible.
    digest = hashlib.sha256(voice.encode(errors="surrogatepass")).digest()
    low, high = {"f": (180.0, 250.0), "m": (95.0, 140.0)}.get(voice[1:2], (120.0, 220.0))
    return low + (high - low) * digest[0] / 255


def _word_blip(word: str, voice: str, base_pitch: float) -> array.array[int]:
    # sha256, not hash(): the built-in string hash is salted per process.
    digest = hashlib.sha256(f"{voice}\0{word}".encode(errors="surrogatepass")).digest()
    pitch = base_pitch * (0.8 + 0.4 * digest[0] / 255)
    # Two formants, snapped to harmonics of the pitch so the blip sounds voiced, not like chords.
    formant1 = max(2, round((300 + 600 * digest[1] / 255) / pitch))
    formant2 = max(formant1 + 1, round((900 + 1500 * digest[2] / 255) / pitch))
    glide = 0.06 + 0.12 * digest[3] / 255
    total = round(_TONE_SECONDS * SAMPLE_RATE)
    attack = round(_ATTACK_SECONDS * SAMPLE_RATE)
    release = round(_RELEASE_SECONDS * SAMPLE_RATE)
    out = array.array("h", bytes(2 * total))
    phase = 0.0
    sin, step = math.sin, 2 * math.pi / SAMPLE_RATE
    for i in range(total):
        # A falling pitch over the word reads as speech-like intonation rather than a beep.
        phase += step * pitch * (1 - glide * i / total)
        envelope = min(1.0, i / attack, (total - i) / release)
        value = 0.5 * sin(phase) + 0.3 * sin(formant1 * phase) + 0.2 * sin(formant2 * phase)
        out[i] = int(value * envelope * 0.6 * 32767)
    return out


def espeak_voice(voice: str) -> str:
    """The espeak-ng voice for a legacy voice name: a/b = American/British, then f/m = sex."""
    language = "en-gb" if voice[:1] == "b" else "en-us"
    variant = {"f": "+f3", "m": "+m3"}.get(voice[1:2], "")
    return language + variant


async def _espeak(executable: str, text: str, voice: str) -> bytes:
    words = text.split()[:MAX_WORDS]
    # An argument vector, never a shell; "--" so a text starting with "-" is not an option.
    process = await asyncio.create_subprocess_exec(
        executable,
        "--stdout",
        "-v",
        espeak_voice(voice),
        "--",
        " ".join(words),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), ESPEAK_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0 or not stdout.startswith(b"RIFF"):
        message = stderr.decode(errors="replace").strip()[:200]
        raise RuntimeError(f"espeak-ng exited {process.returncode}: {message}")
    return _fix_streamed_wav_sizes(stdout)


def _fix_streamed_wav_sizes(audio: bytes) -> bytes:
    # espeak-ng cannot seek stdout, so its header carries placeholder sizes; readers that trust
    # them (and Content-Length checks) need the true ones.
    patched = bytearray(audio)
    patched[4:8] = (len(audio) - 8).to_bytes(4, "little")
    offset = 12
    while offset + 8 <= len(audio):
        chunk_id = audio[offset : offset + 4]
        size = int.from_bytes(audio[offset + 4 : offset + 8], "little")
        if chunk_id == b"data":
            patched[offset + 4 : offset + 8] = (len(audio) - offset - 8).to_bytes(4, "little")
            break
        offset += 8 + size + (size & 1)
    return bytes(patched)


async def _render(engine: _Engine, text: str, voice: str) -> tuple[bytes, str]:
    if engine.espeak_path is not None:
        try:
            return await _espeak(engine.espeak_path, text, voice), AUDIO_CONTENT_TYPE
        except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
            # Like the legacy provider fallback: a failing engine degrades, it does not fail.
            logger.warning("espeak-ng failed, using the synthesized waveform: %s", exc)
    return await asyncio.to_thread(synthesize, text, voice)


# --- HTTP ------------------------------------------------------------------------------------


class _LegacyError(Exception):
    """An error the legacy backend answers in FastAPI's shape, `{"detail": ...}`."""

    def __init__(self, status: int, detail: object) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


def _invalid(loc: list[str | int], kind: str, message: str, value: object) -> _LegacyError:
    return _LegacyError(422, [{"type": kind, "loc": loc, "msg": message, "input": value}])


@web.middleware
async def _legacy_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _LegacyError as error:
        return web.json_response({"detail": error.detail}, status=error.status)


async def _speak(request: web.Request) -> web.StreamResponse:
    engine = request.app[_ENGINE_KEY]
    request.app[DEMO_STATS_KEY].speak_calls += 1
    text, voice = await _read_speak(request)
    if engine.latency_seconds:
        await asyncio.sleep(engine.latency_seconds)
    try:
        audio, content_type = await _render(engine, text, voice)
    except Exception as exc:
        logger.exception("demo synthesis failed")
        raise _LegacyError(503, f"TTS failed with all providers: {exc}") from exc
    response = web.StreamResponse(
        headers={
            "Cache-Control": "no-cache",
            "Access-Control-Allow-Origin": "*",
            "X-TTS-Provider": "deepgram" if voice.startswith("aura-") else "replicate",
            "X-TTS-Cache": "disabled",
        }
    )
    response.content_type = content_type
    response.content_length = len(audio)
    await response.prepare(request)
    # Chunked writes, as the legacy StreamingResponse does, so clients see a real stream.
    for start in range(0, len(audio), CHUNK_BYTES):
        await response.write(audio[start : start + CHUNK_BYTES])
    await response.write_eof()
    return response


async def _read_speak(request: web.Request) -> tuple[str, str]:
    """The text and voice of a speak body, or the legacy backend's error for it."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _LegacyError(413, f"Request body larger than {MAX_BODY_BYTES} bytes") from None
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _invalid(["body"], "json_invalid", f"JSON decode error: {exc}", {}) from None
    if not isinstance(payload, dict):
        raise _invalid(["body"], "dict_type", "Input should be a valid dictionary", payload)
    fields = {"text": "", "voice": DEFAULT_VOICE, "provider": "replicate"}
    for name, default in fields.items():
        value = payload.get(name, default)
        if not isinstance(value, str):
            raise _invalid(["body", name], "string_type", "Input should be a valid string", value)
        fields[name] = value
    text = fields["text"].strip()
    if not text:
        raise _LegacyError(400, "Text is required")
    return text, fields["voice"] or DEFAULT_VOICE


async def _events(request: web.Request) -> web.StreamResponse:
    count = int(_bounded(request.query, "count", 5, 1, 100, integer=True))
    interval = _bounded(request.query, "interval", 1.0, 0.0, 10.0, integer=False)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    try:
        for tick in range(1, count + 1):
            if tick > 1:
                await asyncio.sleep(interval)
            await response.write(f"id: {tick}\ndata: tick {tick}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        logger.debug("event stream client went away")
    return response


def _bounded(
    query: Mapping[str, str], name: str, default: float, low: float, high: float, *, integer: bool
) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        message = f"Input should be a number between {low:g} and {high:g}"
        raise _invalid(["query", name], "value_error", message, raw)
    return value


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response({"speak_calls": request.app[DEMO_STATS_KEY].speak_calls})


async def _index(request: web.Request) -> web.Response:
    return web.Response(text=INDEX_HTML, content_type="text/html")
