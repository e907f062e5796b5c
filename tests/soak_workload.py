"""The chaos soak's traffic: chat users on two devices, the backend's faults, what clients saw."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import aiohttp
from multidict import CIMultiDict

from proxy.speak import CacheKey
from tests.fakes import FakeLegacyBackend, SpeakBehaviour
from tests.local_volume import BAD_IDS

SPEAK: Final = "/api/tts/speak"
USERS: Final = tuple(f"user{i}@example.com" for i in range(8))
CLIENTS_PER_USER: Final = 2  # a phone and a browser, both reading the same chats aloud
THREADS: Final = ("t-0", "t-1", "t-2")
VOICES: Final = ("af_nicole", "af_nicole", "af_nicole", "af_bella")
FALLBACK_VOICE: Final = "aura-2-thalia-en"
AUDIO_BYTES: Final = 48 * 1024
# Ids the proxy must refuse to cache (they would become path segments); "" is no voice at all.
HOSTILE_IDS: Final = tuple(i for i in BAD_IDS if i)
HOSTILE_USERS: Final = ("../x", "a/b@example.com", "x" * 300, ".hidden@example.com")
# What a device does next, by weight; a device also reads aloud what the other one posted.
ACTIONS: Final = {
    "new": 8,
    "recent": 40,
    "old": 18,
    "edit": 3,
    "stale": 2,
    "burst": 8,
    "hostile": 7,
    "audio-url": 12,
}
THINK_SECONDS: Final = 0.02
# The client gives up here; a request that takes this long has failed the soak's bound anyway.
CLIENT_TIMEOUT_SECONDS: Final = 15.0

# How often a backend call faults, and how: each fault is one of these behaviours. A drip is
# slow but whole (below the proxy's upstream timeout): it must be stored like any clean answer.
FAULT_RATE: Final = 0.12
FAULTS: Final[dict[str, dict[str, Any]]] = {
    "reset": {"reset": True},
    "reset-mid-body": {"truncate": True, "reset": True},
    "truncate": {"truncate": True},
    "truncate-chunked": {"truncate": True, "chunked": True},
    "status-500": {"status": 500},
    "non-audio": {"content_type": "text/html; charset=utf-8"},
    "hang": {"headers_delay": 10.0},
    "stall": {"chunk_delay": 10.0},
    "fallback": {"fallback_voice": FALLBACK_VOICE, "provider": "deepgram"},
    "drip": {"chunks": 12, "chunk_delay": 0.05},
}
HARMLESS_FAULTS: Final = frozenset({"drip"})


class Recording(NamedTuple):
    """What one synthesis is for: a unique (user, thread, message, voice, text)."""

    user: str
    thread: str
    message: str
    voice: str
    text: str

    @property
    def key(self) -> CacheKey:
        """The proxy's cache key for it (the text is matched by digest)."""
        return CacheKey(self.user, self.thread, self.message, self.voice)

    def audio(self, voice: str | None = None) -> bytes:
        """The bytes the fake backend makes for it (in `voice` when a stand-in speaks)."""
        return _audio(self.user, self.thread, self.message, voice or self.voice, self.text)


@functools.lru_cache(maxsize=8192)
def _audio(user: str, thread: str, message: str, voice: str, text: str) -> bytes:
    salt = FakeLegacyBackend.request_salt(user, thread, message, voice)
    return FakeLegacyBackend.audio_for(text, salt, AUDIO_BYTES)


def text_for(thread: str, message: str, version: int) -> str:
    """A message's text; the same for every user, so only the key keeps their audio apart."""
    return f"{thread}/{message}, version {version}: the quick brown fox reads it aloud"


@dataclass
class BackendCall:
    """One speak call the backend received: for what, how it answered, when, from which request."""

    recording: Recording
    fault: str | None
    arrived: float
    request_id: str


class FaultPlan:
    """The backend's behaviour per call, from the seed, the recording and its call number."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.calls: list[BackendCall] = []
        self._counts: Counter[Recording] = Counter()

    def __call__(self, document: dict[str, Any], headers: CIMultiDict[str]) -> SpeakBehaviour:
        """Choose one call's behaviour; calls for ids the proxy must refuse never fault."""
        recording = Recording(
            headers.get("X-Forwarded-Email", ""),
            str(document.get("thread_id")),
            str(document.get("message_id")),
            str(document.get("voice") or "af_nicole"),
            str(document.get("text") or "").strip(),
        )
        number = self._counts[recording]
        self._counts[recording] += 1
        fault: str | None = None
        if recording.key.valid():
            draw = random.Random(f"{self.seed}|{recording}|{number}")
            if draw.random() < FAULT_RATE:
                fault = draw.choice(sorted(FAULTS))
        self.calls.append(
            BackendCall(recording, fault, time.monotonic(), headers.get("X-Request-Id", ""))
        )
        options = {"size": AUDIO_BYTES, "chunks": 6, "per_request": True}
        options.update(FAULTS[fault] if fault is not None else {})
        return SpeakBehaviour(**options)


@dataclass
class Observation:
    """What one client request saw, judged against the audio it should carry."""

    client: int
    action: str
    recording: Recording
    request_id: str
    generation: int
    sent: float
    hostile: bool = False
    audio_url: bool = False
    status: int | None = None
    cache: str | None = None
    tier: str | None = None
    content_type: str = ""
    fallback: bool = False
    headers_at: float | None = None
    ended: float = 0.0
    # complete (the body ended as framed), cut (the connection broke), timeout
    outcome: str = "complete"
    error: str = ""
    body_length: int = 0
    body_sha256: str = ""
    # right, stand-in (the fallback voice's audio), prefix (a cut body, right so far), wrong,
    # error (a non-2xx answer: not audio), absent (audio URL 404)
    verdict: str = ""


@dataclass
class Conversation:
    """One user's chats, shared by the user's devices: messages in threads, and their edits."""

    user: str
    messages: list[tuple[str, str]] = field(default_factory=list)
    versions: dict[tuple[str, str], int] = field(default_factory=dict)

    def post(self, rng: random.Random) -> tuple[str, str]:
        """A new message in one of the threads."""
        message = (rng.choice(THREADS), f"m-{len(self.messages)}")
        self.messages.append(message)
        self.versions[message] = 0
        return message

    def recent(self, rng: random.Random, depth: int = 6) -> tuple[str, str]:
        """One of the latest messages."""
        return rng.choice(self.messages[-depth:])

    def edit(self, rng: random.Random) -> tuple[str, str]:
        """A recent message, edited (same ids, new text)."""
        message = self.recent(rng)
        self.versions[message] += 1
        return message

    def recording(
        self, message: tuple[str, str], voice: str, version: int | None = None
    ) -> Recording:
        """The recording of a message's current (or given) version in `voice`."""
        thread, message_id = message
        chosen = self.versions[message] if version is None else version
        return Recording(self.user, thread, message_id, voice, text_for(thread, message_id, chosen))


def judge_body(recording: Recording, body: bytes, complete: bool) -> str:
    """right / stand-in / prefix / wrong: the body against the audio made for `recording`."""
    for verdict, audio in (
        ("right", recording.audio()),
        ("stand-in", recording.audio(FALLBACK_VOICE)),
    ):
        if complete and body == audio:
            return verdict
        if not complete and audio.startswith(body):
            return "prefix"
    return "wrong"


class Clients:
    """Sixteen clients of eight users, each on its own connection pool, until `stop` is set.

    Requests wait on `gate` (cleared while the proxy restarts); `idle` is set when none is
    in flight.
    """

    def __init__(
        self, seed: int, base_url: Callable[[], str], generation: Callable[[], int]
    ) -> None:
        self.seed = seed
        self.base_url = base_url
        self.generation = generation
        self.conversations = {user: Conversation(user) for user in USERS}
        self.inboxes: list[list[tuple[str, str]]] = [
            [] for _ in range(len(USERS) * CLIENTS_PER_USER)
        ]
        self.observations: list[Observation] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.idle = asyncio.Event()
        self.idle.set()
        self._in_flight = 0
        self._ids = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Every client's loop, until `stop`."""
        await asyncio.gather(*(self._client(index, stop) for index in range(len(self.inboxes))))

    async def _client(self, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.seed}|client|{index}")
        conversation = self.conversations[USERS[index // CLIENTS_PER_USER]]
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                await self._act(session, rng, index, conversation)
                await asyncio.sleep(rng.uniform(0, THINK_SECONDS))

    async def _act(
        self, session: aiohttp.ClientSession, rng: random.Random, index: int, chat: Conversation
    ) -> None:
        voice = rng.choice(VOICES)
        inbox = self.inboxes[index]
        if inbox:  # the other device posted or edited: this one reads it aloud too
            await self.speak(session, index, "autoplay", chat.recording(inbox.pop(0), voice))
            return
        action = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        if not chat.messages:
            action = "new"
        if action == "audio-url":
            recording = chat.recording(chat.recent(rng), voice)
            await self.fetch_audio(session, index, rng, chat, recording)
            return
        recording, copies = self._choose(action, rng, index, chat, voice)
        await asyncio.gather(
            *(self.speak(session, index, action, recording) for _ in range(copies))
        )

    def _choose(
        self, action: str, rng: random.Random, index: int, chat: Conversation, voice: str
    ) -> tuple[Recording, int]:
        """What a speak action asks for, and how many identical requests go at once."""
        if action in ("new", "edit"):
            message = chat.post(rng) if action == "new" else chat.edit(rng)
            self.inboxes[index ^ 1].append(message)
            return chat.recording(message, voice), 1
        if action == "old":
            return chat.recording(rng.choice(chat.messages), voice), 1
        message = chat.recent(rng)
        if action == "stale":  # a device that missed the edit asks for an earlier text
            version = rng.randrange(chat.versions[message] + 1)
            return chat.recording(message, voice, version), 1
        recording = chat.recording(message, voice)
        if action == "burst":
            return recording, rng.randint(3, 8)
        if action == "hostile":
            return self._hostile(rng, recording), 1
        return recording, 1

    @staticmethod
    def _hostile(rng: random.Random, recording: Recording) -> Recording:
        """The same request with one id the proxy must not cache under."""
        where = rng.choice(("user", "thread", "message", "voice"))
        if where == "user":
            return recording._replace(user=rng.choice(HOSTILE_USERS))
        return recording._replace(**{where: rng.choice(HOSTILE_IDS)})

    def _observe(self, index: int, action: str, recording: Recording) -> Observation:
        self._ids += 1
        observation = Observation(
            index,
            action,
            recording,
            f"soak-{index}-{self._ids}",
            self.generation(),
            time.monotonic(),
        )
        observation.hostile = not recording.key.valid()
        self.observations.append(observation)
        return observation

    async def speak(
        self, session: aiohttp.ClientSession, index: int, action: str, recording: Recording
    ) -> None:
        """POST one speak call, as the Flutter client sends it, and judge what comes back."""
        payload = {
            "text": recording.text,
            "provider": "replicate",
            "voice": recording.voice,
            "message_id": recording.message,
            "thread_id": recording.thread,
            "save_to_volume": True,
        }
        await self.gate.wait()
        seen = self._observe(index, action, recording)
        headers = {"X-Forwarded-Email": recording.user, "X-Request-Id": seen.request_id}
        await self._exchange(
            seen, session.post(self.base_url() + SPEAK, json=payload, headers=headers)
        )

    async def fetch_audio(
        self,
        session: aiohttp.ClientSession,
        index: int,
        rng: random.Random,
        chat: Conversation,
        recording: Recording,
    ) -> None:
        """GET a message's audio URL (sometimes a Range of it), as an <audio> element would."""
        await self.gate.wait()
        seen = self._observe(index, "audio-url", recording)
        seen.audio_url = True
        headers = {"X-Forwarded-Email": recording.user, "X-Request-Id": seen.request_id}
        first = rng.randrange(AUDIO_BYTES) if rng.random() < 0.3 else None
        if first is not None:
            headers["Range"] = f"bytes={first}-"
        path = recording.key.audio_path()
        await self._exchange(seen, session.get(self.base_url() + path, headers=headers))
        if seen.status == 404:
            seen.verdict = "absent"
        elif seen.status in (200, 206) and seen.outcome == "complete":
            # Whichever version the cache holds, it must be this user's, this message's, voice's.
            message = (recording.thread, recording.message)
            seen.verdict = "wrong"
            for version in range(chat.versions[message] + 1):
                audio = chat.recording(message, recording.voice, version).audio()
                if _sha256(audio[first or 0 :]) == seen.body_sha256:
                    seen.verdict = "right"

    async def _exchange(self, seen: Observation, call: Any) -> None:
        """Send, read the whole body, and record what happened when."""
        self._in_flight += 1
        self.idle.clear()
        body = bytearray()
        try:
            async with call as response:
                seen.headers_at = time.monotonic()
                seen.status = response.status
                seen.cache = response.headers.get("X-TTS-Cache")
                seen.tier = response.headers.get("X-TTS-Cache-Tier")
                seen.content_type = response.headers.get("Content-Type", "")
                seen.fallback = "X-TTS-Fallback" in response.headers
                async for chunk in response.content.iter_any():
                    body += chunk
        except TimeoutError:
            seen.outcome = "timeout"
        except aiohttp.ClientError as exc:
            seen.outcome, seen.error = "cut", type(exc).__name__
        finally:
            seen.ended = time.monotonic()
            self._in_flight -= 1
            if not self._in_flight:
                self.idle.set()
        seen.body_length = len(body)
        seen.body_sha256 = _sha256(bytes(body))
        if seen.audio_url:
            return
        if seen.status is not None and seen.status != 200:
            seen.verdict = "error"
        else:
            seen.verdict = judge_body(seen.recording, bytes(body), seen.outcome == "complete")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
