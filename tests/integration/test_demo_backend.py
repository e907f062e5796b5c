"""The demo legacy backend over real HTTP: the speak contract, errors, stats and events."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
import wave
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy import demo
from proxy.demo import create_demo_app, synthesize

DemoClient = TestClient[web.Request, web.Application]

TEXT = "The quick brown fox jumps over the lazy dog."


async def _client(aiohttp_client: AiohttpClient, latency_seconds: float = 0.0) -> DemoClient:
    # The waveform path keeps the tests fast and independent of espeak-ng being installed.
    app = create_demo_app(use_espeak=False, latency_seconds=latency_seconds)
    return await aiohttp_client(app)


async def _speak_calls(client: DemoClient) -> int:
    response = await client.get("/api/tts/stats")
    assert response.status == 200
    calls: int = (await response.json())["speak_calls"]
    return calls


async def test_speak_streams_wav_with_the_legacy_headers(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {
        "text": f"  {TEXT}  ",
        "provider": "replicate",
        "voice": "bf_emma",
        "message_id": "m-1",
        "thread_id": "t-1",
        "save_to_volume": True,
    }
    response = await client.post("/api/tts/speak", json=body)
    audio = await response.read()
    assert response.status == 200
    assert response.headers["Content-Type"] == "audio/wav"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["X-TTS-Provider"] == "replicate"
    assert response.headers["X-TTS-Cache"] == "disabled"
    assert int(response.headers["Content-Length"]) == len(audio)
    assert audio == synthesize(TEXT, "bf_emma")[0]
    with wave.open(io.BytesIO(audio), "rb") as reader:
        assert reader.getframerate() == demo.SAMPLE_RATE


async def test_speak_defaults_to_af_nicole(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    response = await client.post("/api/tts/speak", json={"text": TEXT})
    assert response.status == 200
    assert await response.read() == synthesize(TEXT, "af_nicole")[0]


async def test_aura_voices_are_spoken_by_deepgram(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = {"text": TEXT, "voice": "aura-2-thalia-en", "provider": "deepgram"}
    response = await client.post("/api/tts/speak", json=body)
    assert response.status == 200
    assert response.headers["X-TTS-Provider"] == "deepgram"


@pytest.mark.parametrize("body", [{"text": ""}, {"text": "   \n"}, {"voice": "af_nicole"}])
async def test_empty_text_is_400(aiohttp_client: AiohttpClient, body: dict[str, str]) -> None:
    client = await _client(aiohttp_client)
    response = await client.post("/api/tts/speak", json=body)
    assert response.status == 400
    assert await response.json() == {"detail": "Text is required"}


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"", b'["a list"]', b'{"text": 5}'])
async def test_malformed_body_is_422_like_fastapi(
    aiohttp_client: AiohttpClient, raw: bytes
) -> None:
    client = await _client(aiohttp_client)
    response = await client.post(
        "/api/tts/speak", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert detail[0]["loc"][0] == "body"


async def test_oversized_body_is_413(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    body = json.dumps({"text": "a" * (demo.MAX_BODY_BYTES + 1)}).encode()
    headers = {"Content-Type": "application/json"}
    response = await client.post("/api/tts/speak", data=io.BytesIO(body), headers=headers)
    assert response.status == 413
    assert "detail" in await response.json()


async def test_synthesis_failure_is_503(
    aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(text: str, voice: str) -> tuple[bytes, str]:
        raise RuntimeError("no voice today")

    monkeypatch.setattr(demo, "synthesize", broken)
    client = await _client(aiohttp_client)
    response = await client.post("/api/tts/speak", json={"text": TEXT})
    assert response.status == 503
    detail = (await response.json())["detail"]
    assert detail.startswith("TTS failed with all providers")


async def test_stats_count_every_speak_call(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    assert await _speak_calls(client) == 0
    await client.post("/api/tts/speak", json={"text": TEXT})
    await client.post("/api/tts/speak", json={"text": TEXT})
    await client.post("/api/tts/speak", json={"text": ""})
    assert await _speak_calls(client) == 3
    assert demo.get_demo_stats(client.app).speak_calls == 3


async def test_latency_delays_the_answer(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client, latency_seconds=0.1)
    started = time.perf_counter()
    response = await client.post("/api/tts/speak", json={"text": TEXT})
    await response.read()
    assert time.perf_counter() - started >= 0.1


async def test_health_and_index(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    health = await client.get("/health")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    index = await client.get("/")
    assert index.status == 200
    assert index.content_type == "text/html"
    page = await index.text()
    assert "demo" in page
    assert "/api/tts/speak" in page


async def test_events_arrive_in_order(aiohttp_client: AiohttpClient) -> None:
    client = await _client(aiohttp_client)
    response = await client.get("/api/events", params={"count": "4", "interval": "0.01"})
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    data = [line.decode().strip() async for line in response.content if line.startswith(b"data:")]
    assert data == [f"data: tick {n}" for n in range(1, 5)]


@pytest.mark.parametrize("query", [{"count": "0"}, {"count": "x"}, {"interval": "3600"}])
async def test_events_bound_their_query(
    aiohttp_client: AiohttpClient, query: dict[str, str]
) -> None:
    client = await _client(aiohttp_client)
    response = await client.get("/api/events", params=query)
    assert response.status == 422
    assert (await response.json())["detail"][0]["loc"][0] == "query"


# --- espeak-ng, through a stand-in binary on PATH ----------------------------------------------

_FAKE_ESPEAK = """\
import io, json, os, sys, wave
from pathlib import Path

Path(os.environ["FAKE_ESPEAK_ARGV"]).write_text(json.dumps(sys.argv[1:]))
if os.environ.get("FAKE_ESPEAK_EXIT"):
    sys.stderr.write("voice not found")
    sys.exit(1)
buffer = io.BytesIO()
with wave.open(buffer, "wb") as writer:
    writer.setnchannels(1)
    writer.setsampwidth(2)
    writer.setframerate(22050)
    writer.writeframes(b"\\x01\\x00" * 1000)
audio = bytearray(buffer.getvalue())
# espeak-ng cannot seek stdout, so it writes placeholder sizes.
audio[4:8] = (0x7FFFFFFF).to_bytes(4, "little")
audio[40:44] = (0x7FFFF000).to_bytes(4, "little")
sys.stdout.buffer.write(bytes(audio))
"""


@pytest.fixture
def fake_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `espeak-ng` alone on PATH; returns where it records its arguments."""
    binary = tmp_path / "espeak-ng"
    binary.write_text(f"#!{sys.executable}\n{_FAKE_ESPEAK}")
    binary.chmod(0o755)
    argv_file = tmp_path / "argv.json"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("FAKE_ESPEAK_ARGV", str(argv_file))
    return argv_file


async def test_espeak_gets_an_argument_vector_and_its_wav_is_repaired(
    aiohttp_client: AiohttpClient, fake_espeak: Path
) -> None:
    client = await aiohttp_client(create_demo_app())
    text = "-v sneaky; echo $(id)"
    response = await client.post("/api/tts/speak", json={"text": text, "voice": "bm_george"})
    audio = await response.read()
    assert response.status == 200
    recorded = json.loads(await asyncio.to_thread(fake_espeak.read_text))
    assert recorded == ["--stdout", "-v", "en-gb+m3", "--", text]
    with wave.open(io.BytesIO(audio), "rb") as reader:
        assert reader.getnframes() == 1000
    assert int.from_bytes(audio[4:8], "little") == len(audio) - 8


async def test_failing_espeak_falls_back_to_the_waveform(
    aiohttp_client: AiohttpClient, fake_espeak: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ESPEAK_EXIT", "1")
    client = await aiohttp_client(create_demo_app(use_espeak=True))
    response = await client.post("/api/tts/speak", json={"text": TEXT})
    assert response.status == 200
    assert await response.read() == synthesize(TEXT, "af_nicole")[0]


def test_use_espeak_without_the_binary_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="espeak-ng"):
        create_demo_app(use_espeak=True)
