"""FakeReplicateApi: Replicate's predictions API, as replicate-python 1.x calls it, on loopback.

What it follows, and where from:
- `POST /v1/predictions` with `{"version", "input"}` (a pinned community model such as
  jaaari/kokoro-82m:VERSION) and `POST /v1/models/{owner}/{name}/predictions` with `{"input"}`
  (an official model): replicate/prediction.py and replicate/model.py `async_create`.
  `Prefer: wait` or `Prefer: wait=N` holds the request until the prediction is done, and the
  answer is 201 with the prediction, `output` set
  (replicate.com/docs/topics/predictions/create-a-prediction).
- `GET /v1/predictions/{id}` (`async_wait` polls it while the status is not terminal),
  `POST /v1/predictions/{id}/cancel`, `GET /v1/models/{owner}/{name}/versions/{id}` (`async_run`).
- A prediction is `{"id", "model", "version", "status", "input", "output", "error", "logs",
  "metrics", "created_at", ..., "urls"}`; `model`, `version`, `id` and `status` are required by
  the library's pydantic model.
- Errors are problem details (`{"title", "detail", "status"}`): 401 "Unauthenticated", 429
  "Request was throttled. ..." with Retry-After (replicate.com/docs/topics/predictions/rate-limits).
- Auth: `Authorization: Bearer <token>` (the library) or `Token <token>` (older clients).
- Output files are served by the emulator itself under /files/, without auth, as
  replicate.delivery serves them: the tests check the API token is never sent there.

Faults are injected at runtime with `inject(...)`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

from proxy.demo import synthesize
from tests.fakes.local_server import Fault, FaultyServer

CHUNK: Final = 8 * 1024
FaultKind = Literal[
    "unauthorized",  # 401 on the API
    "throttled",  # 429 with Retry-After on the API
    "error",  # 500 on the API
    "slow",  # the API answers only after `delay` seconds
    "failed",  # the prediction ends "failed", with an error
    "empty",  # the prediction succeeds with no output
    "download_error",  # the output file answers 500
    "cut",  # the output file advertises its length, sends half, and the connection closes
    "cut_before",  # the same, with no byte sent at all
]


@dataclass
class RecordedPrediction:
    """One prediction the emulator was asked for."""

    model: str
    version: str
    input: dict[str, Any]
    prefer: str | None
    authorization: str | None

    @property
    def text(self) -> str:
        """The text the model was asked to speak."""
        return str(self.input.get("text", ""))

    @property
    def voice(self) -> str:
        """The voice asked for."""
        return str(self.input.get("voice", ""))


@dataclass
class _Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    status: str = "starting"
    output: str | None = None
    error: str | None = None
    polls_left: int = 0
    file_fault: FaultKind | None = None
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ"))


class FakeReplicateApi(FaultyServer):
    """Replicate's predictions API on 127.0.0.1, with call records and fault injection."""

    def __init__(
        self,
        *,
        tokens: Iterable[str] = ("r8_emulator0token0000000000000000000000",),
        versions: Iterable[str] = (),
        chunk_size: int = CHUNK,
        chunk_delay: float = 0.0,
        echo_auth_in_errors: bool = False,
    ) -> None:
        super().__init__()
        self.tokens: set[str] = set(tokens)
        # Known versions; empty means any version id is accepted.
        self.versions: set[str] = set(versions)
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        # No real server does this; it proves a server that did could not leak the token.
        self.echo_auth_in_errors = echo_auth_in_errors
        # GETs that answer "processing" before a prediction succeeds (0: done at creation).
        self.polls_before_done = 0
        self.file_content_type = "audio/wav"
        self.calls: Counter[str] = Counter()
        self.predictions: list[RecordedPrediction] = []
        self.file_authorizations: list[str | None] = []
        self.canceled: list[str] = []
        self._store: dict[str, _Prediction] = {}
        self._ids = itertools.count(1)

    def add_routes(self, app: web.Application) -> None:
        """The emulated API's routes."""
        app.router.add_post("/v1/predictions", self._create)
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self._create)
        app.router.add_get("/v1/predictions/{id}", self._get)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        app.router.add_get("/v1/models/{owner}/{name}/versions/{version}", self._version)
        app.router.add_get("/files/{id}/output.wav", self._file)

    @staticmethod
    def audio_for(text: str, voice: str) -> bytes:
        """The WAV the emulator serves for `text` in `voice`."""
        return synthesize(text, voice)[0]

    # Handlers

    async def _create(self, request: web.Request) -> web.Response:
        self.calls["create"] += 1
        authorization = request.headers.get("Authorization")
        body = await request.json()
        owner, name = request.match_info.get("owner"), request.match_info.get("name")
        version = str(body.get("version") or "")
        model = f"{owner}/{name}" if owner and name else "jaaari/kokoro-82m"
        self.predictions.append(
            RecordedPrediction(
                model=model,
                version=version,
                input=dict(body.get("input") or {}),
                prefer=request.headers.get("Prefer"),
                authorization=authorization,
            )
        )
        refused = self._refuse(authorization)
        if refused is not None:
            return refused
        fault = self._take_fault()
        if fault is not None:
            answered = await self._api_fault(fault, authorization)
            if answered is not None:
                return answered
        if not version and not (owner and name):
            return _problem(422, "Invalid version or not permitted", "version is required")
        if self.versions and version and version not in self.versions:
            return _problem(422, "Invalid version or not permitted", "version does not exist")
        prediction = _Prediction(
            id=f"pred{next(self._ids):06d}",
            model=model,
            version=version or "official",
            input=dict(body.get("input") or {}),
            polls_left=self.polls_before_done,
            file_fault=fault.kind if fault is not None else None,
        )
        self._store[prediction.id] = prediction
        if prediction.polls_left == 0:
            self._finish(prediction)
        return web.json_response(self._json(prediction), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        self.calls["get"] += 1
        refused = self._refuse(request.headers.get("Authorization"))
        if refused is not None:
            return refused
        prediction = self._store.get(request.match_info["id"])
        if prediction is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        if prediction.status in {"starting", "processing"}:
            if prediction.polls_left > 0:
                prediction.polls_left -= 1
                prediction.status = "processing"
            else:
                self._finish(prediction)
        return web.json_response(self._json(prediction))

    async def _cancel(self, request: web.Request) -> web.Response:
        self.calls["cancel"] += 1
        refused = self._refuse(request.headers.get("Authorization"))
        if refused is not None:
            return refused
        prediction = self._store.get(request.match_info["id"])
        if prediction is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        self.canceled.append(prediction.id)
        if prediction.status not in {"succeeded", "failed"}:
            prediction.status = "canceled"
        return web.json_response(self._json(prediction))

    async def _version(self, request: web.Request) -> web.Response:
        self.calls["version"] += 1
        refused = self._refuse(request.headers.get("Authorization"))
        if refused is not None:
            return refused
        version = request.match_info["version"]
        schema = {"components": {"schemas": {"Output": {"type": "string", "format": "uri"}}}}
        return web.json_response(
            {
                "id": version,
                "created_at": "2025-01-01T00:00:00Z",
                "cog_version": "0.9.0",
                "openapi_schema": schema,
            }
        )

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.calls["file"] += 1
        self.file_authorizations.append(request.headers.get("Authorization"))
        prediction = self._store.get(request.match_info["id"])
        if prediction is None:
            return web.Response(status=404, text="not found")
        if prediction.file_fault == "download_error":
            return web.Response(status=500, text="internal error")
        audio = self.audio_for(
            str(prediction.input.get("text", "")), str(prediction.input["voice"])
        )
        response = web.StreamResponse(
            headers={"Content-Type": self.file_content_type, "Content-Length": str(len(audio))}
        )
        await response.prepare(request)
        cut = prediction.file_fault in {"cut", "cut_before"}
        send = audio[: len(audio) // 2] if prediction.file_fault == "cut" else audio
        if prediction.file_fault == "cut_before":
            send = b""
        for start in range(0, len(send), self.chunk_size):
            await response.write(send[start : start + self.chunk_size])
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if cut:
            # The length was promised; closing now is how a client learns the body is short.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    # Helpers

    def _refuse(self, authorization: str | None) -> web.Response | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() in {"bearer", "token"} and token.strip() in self.tokens:
            return None
        detail = "You did not pass a valid authentication token"
        if self.echo_auth_in_errors:
            detail += f" (got Authorization: {authorization})"
        return _problem(401, "Unauthenticated", detail)

    def _take_fault(self) -> Fault | None:
        fault = self.fault
        if fault is None or not fault.take():
            return None
        return fault

    async def _api_fault(self, fault: Fault, authorization: str | None) -> web.Response | None:
        echo = f" (got Authorization: {authorization})" if self.echo_auth_in_errors else ""
        if fault.kind == "unauthorized":
            return _problem(401, "Unauthenticated", "Invalid token" + echo)
        if fault.kind == "throttled":
            return _problem(
                429,
                "Request was throttled.",
                f"Request was throttled. Your rate limit resets in ~{fault.retry_after}s.",
                headers={"Retry-After": str(fault.retry_after)},
            )
        if fault.kind == "error":
            return _problem(500, "Internal Server Error", "Something went wrong" + echo)
        if fault.kind == "slow":
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=fault.delay)
            except TimeoutError:
                pass
            return None
        return None

    def _finish(self, prediction: _Prediction) -> None:
        if prediction.file_fault == "failed":
            prediction.status = "failed"
            prediction.error = "CUDA out of memory"
            return
        prediction.status = "succeeded"
        if prediction.file_fault != "empty":
            prediction.output = f"{self.url}/files/{prediction.id}/output.wav"

    def _json(self, prediction: _Prediction) -> dict[str, Any]:
        base = f"{self.url}/v1/predictions/{prediction.id}"
        done = prediction.status in {"succeeded", "failed", "canceled"}
        return {
            "id": prediction.id,
            "model": prediction.model,
            "version": prediction.version,
            "input": prediction.input,
            "logs": "",
            "output": prediction.output,
            "data_removed": False,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": prediction.created_at,
            "started_at": prediction.created_at,
            "completed_at": prediction.created_at if done else None,
            "metrics": {"predict_time": 0.1} if done else {},
            "urls": {"get": base, "cancel": f"{base}/cancel", "web": base},
        }


def _problem(
    status: int, title: str, detail: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"title": title, "detail": detail, "status": status}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )
