"""FilesApiEmulator: the Databricks Files API (2.0) and workspace OAuth as a real aiohttp server.

What it follows, and where from:
- `PUT/GET/HEAD/DELETE /api/2.0/fs/files{path}` and `.../fs/directories{path}` as
  docs.databricks.com/api/files/v2 documents them: upload `overwrite` defaults to true, GET
  supports Range and If-Unmodified-Since, a listing page holds at most 1000 entries and the
  listing ends when there is no `next_page_token`; an empty directory lists as `{}` (proto3 JSON
  drops empty lists).
- Error bodies `{"error_code", "message"[, "details"]}` (docs.databricks.com/api/.../errors):
  404 NOT_FOUND, 409 ALREADY_EXISTS for `overwrite=false` on an existing file, 400
  INVALID_PARAMETER_VALUE with reason FILES_API_DIRECTORY_IS_NOT_EMPTY for a non-empty
  directory delete, as the Databricks CLI's Files API client expects them. An upload creates the
  missing parent directories.
- What databricks-sdk-py (0.162) calls: `/.well-known/databricks-config` (host metadata, whose
  `oidc_endpoint` gives the OIDC discovery URL), `/oidc/.well-known/oauth-authorization-server`,
  the token endpoint with the client_credentials grant and HTTP Basic client authentication, and
  `POST /api/2.0/fs/create-download-url` (its default download path: a presigned URL).
- Invalid tokens answer 403 "Invalid access token.", missing credentials 401.

Faults, latency and corruption are injected at runtime by the tests; `max_concurrent` and
`max_per_second` are the workspace's request budget (429 with Retry-After past either, counted
in `over_limit`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, Final, Literal
from urllib.parse import unquote

from aiohttp import web

from tests.fakes.local_server import LocalServer

FILES_PREFIX: Final = "/api/2.0/fs/files"
DIRECTORIES_PREFIX: Final = "/api/2.0/fs/directories"
DOWNLOAD_URL_PATH: Final = "/api/2.0/fs/create-download-url"
PRESIGNED_PREFIX: Final = "/_presigned/"
MAX_PAGE_SIZE: Final = 1000
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

Endpoint = Literal[
    "files", "directories", "download-url", "presigned", "oauth", "metadata", "other"
]
FaultKind = Literal["status", "throttle", "cut", "hang"]


@dataclass
class StoredFile:
    """One file's bytes and modification time (seconds since the epoch)."""

    data: bytes
    modified: float


@dataclass
class RecordedRequest:
    """One request the emulator received: what, where, with which token, and the status sent.

    `status` is None while the request is unanswered (a hang) or when no status line went out.
    """

    method: str
    endpoint: Endpoint
    path: str
    token: str | None
    workspace_id: str | None = None
    status: int | None = None


_RECORD: Final = web.RequestKey("files_api_emulator.record", RecordedRequest)


@dataclass
class Fault:
    """An injected failure for the next `remaining` matching Files API calls."""

    kind: FaultKind
    remaining: int
    status: int = 500
    retry_after: int = 1
    method: str | None = None
    path_suffix: str | None = None

    def matches(self, method: str, path: str) -> bool:
        """True when this fault applies to a call of `method` on `path`."""
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.path_suffix is None or path.endswith(self.path_suffix)


@dataclass
class _Presigned:
    path: str
    expires: float


@dataclass
class _Reply:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class FilesApiError(Exception):
    """An error answer: HTTP status and the Databricks error body."""

    def __init__(self, status: int, error_code: str, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.reason = reason

    def response(self, method: str) -> web.Response:
        """The JSON error response (no body for HEAD, as HTTP wants)."""
        if method == "HEAD":
            return web.Response(status=self.status)
        body: dict[str, Any] = {"error_code": self.error_code, "message": self.message}
        if self.reason is not None:
            body["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": self.reason,
                    "domain": "filesystem.databricks.com",
                }
            ]
        return web.json_response(body, status=self.status)


def _not_found(path: str, what: str = "file") -> FilesApiError:
    return FilesApiError(404, "NOT_FOUND", f"The {what} being accessed is not found: {path}")


class FilesApiEmulator(LocalServer):
    """The Files API on 127.0.0.1, in memory: token checks, call records, fault injection."""

    def __init__(
        self,
        *,
        volumes: Iterable[str] = ("/Volumes/main/default/tts",),
        tokens: Iterable[str] = ("dapi-app-token",),
        clients: Mapping[str, str] | None = None,
        chunk_size: int = 16 * 1024,
        page_limit: int = MAX_PAGE_SIZE,
        workspace_id: str = "1234567890123456",
        account_id: str = "00000000-0000-0000-0000-000000000000",
        token_lifetime_seconds: int = 3600,
        max_concurrent: int | None = None,
        max_per_second: int | None = None,
    ) -> None:
        super().__init__()
        self.volumes: tuple[str, ...] = tuple(v.rstrip("/") for v in volumes)
        self.tokens: set[str] = set(tokens)
        self.clients: dict[str, str] = dict(
            clients if clients is not None else {"app-client-id": "app-client-secret"}
        )
        self.issued_tokens: dict[str, str] = {}
        self.chunk_size = chunk_size
        self.page_limit = page_limit
        self.workspace_id = workspace_id
        self.account_id = account_id
        self.token_lifetime_seconds = token_lifetime_seconds
        # Seconds added before every Files API answer, and between the chunks of a download.
        self.latency = 0.0
        self.chunk_delay = 0.0
        self.files: dict[str, StoredFile] = {}
        self.directories: set[str] = set(self.volumes)
        self.requests: list[RecordedRequest] = []
        self.calls: Counter[str] = Counter()
        # Files API requests being answered now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        # The workspace's concurrency limit: a call past it is answered 429 at once, counted.
        self.max_concurrent = max_concurrent
        # The workspace's rate limit: calls started within the last second, past which a call is
        # answered 429 at once (counted in over_limit too).
        self.max_per_second = max_per_second
        self._started: deque[float] = deque()
        self.over_limit = 0
        self.faults: list[Fault] = []
        # Awaited with each new OAuth token before it is sent (e.g. to make it a database
        # password, as Lakebase accepts the app's token); it may also delay the answer.
        self.on_token_issued: Callable[[str, int], Awaitable[None]] | None = None
        self._presigned: dict[str, _Presigned] = {}

    # Lifecycle

    def add_routes(self, app: web.Application) -> None:
        """The emulated API's routes."""
        app.router.add_route("*", "/{tail:.*}", self._dispatch)

    # Test helpers

    def add_token(self, token: str) -> None:
        """Accept `token` from now on (e.g. a user's on-behalf-of token)."""
        self.tokens.add(token)

    def revoke(self, token: str) -> None:
        """Refuse `token` from now on."""
        self.tokens.discard(token)
        self.issued_tokens.pop(token, None)

    def write(self, path: str, data: bytes) -> None:
        """Store `data` at `path` directly (parents created), bypassing HTTP."""
        self._make_parents(path)
        self.files[path] = StoredFile(data, time.time())

    def read(self, path: str) -> bytes | None:
        """The bytes stored at `path`, or None."""
        stored = self.files.get(path)
        return None if stored is None else stored.data

    def corrupt(self, path: str) -> None:
        """Flip one byte in the middle of the stored file, keeping its length and mtime."""
        stored = self.files[path]
        data = bytearray(stored.data)
        data[len(data) // 2] ^= 0xFF
        stored.data = bytes(data)

    def tokens_used(
        self, path_prefix: str = "", endpoint: Endpoint | None = None
    ) -> set[str | None]:
        """Every token that requests under `path_prefix` (optionally one endpoint) carried."""
        return {
            r.token
            for r in self.requests
            if r.path.startswith(path_prefix) and (endpoint is None or r.endpoint == endpoint)
        }

    def count(
        self, method: str | None = None, endpoint: Endpoint | None = None, path_suffix: str = ""
    ) -> int:
        """How many requests matched (method, endpoint, path suffix)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and (endpoint is None or r.endpoint == endpoint)
            and r.path.endswith(path_suffix)
        )

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        method: str | None = None,
        path_suffix: str | None = None,
    ) -> Fault:
        """Answer the next `count` matching Files API calls with `status` and an error body."""
        return self._add_fault(
            Fault("status", count, status=status, method=method, path_suffix=path_suffix)
        )

    def throttle_next(
        self,
        count: int = 1,
        *,
        retry_after: int = 1,
        method: str | None = None,
        path_suffix: str | None = None,
    ) -> Fault:
        """Answer the next `count` matching calls 429 with `Retry-After: retry_after`."""
        return self._add_fault(
            Fault(
                "throttle",
                count,
                status=429,
                retry_after=retry_after,
                method=method,
                path_suffix=path_suffix,
            )
        )

    def cut_next(self, count: int = 1, *, path_suffix: str | None = None) -> Fault:
        """Cut the next `count` file downloads short: full Content-Length, half the body, close."""
        return self._add_fault(Fault("cut", count, method="GET", path_suffix=path_suffix))

    def hang_next(
        self, count: int = 1, *, method: str | None = None, path_suffix: str | None = None
    ) -> Fault:
        """Never answer the next `count` matching calls (until `stop()`)."""
        return self._add_fault(Fault("hang", count, method=method, path_suffix=path_suffix))

    def _add_fault(self, fault: Fault) -> Fault:
        """Queue `fault`; the caller may end it early with `fault.remaining = 0`."""
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Forget every pending fault and the added latency."""
        self.faults.clear()
        self.latency = 0.0
        self.chunk_delay = 0.0

    # Dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path.split("?", 1)[0]
        method = request.method
        endpoint, path = _classify(raw)
        record = RecordedRequest(
            method,
            endpoint,
            path,
            _bearer(request),
            request.headers.get("X-Databricks-Workspace-Id"),
        )
        request[_RECORD] = record
        self.requests.append(record)
        self.calls[f"{method} {raw if endpoint in ('oauth', 'metadata') else path}"] += 1
        counted = endpoint not in ("oauth", "metadata")
        if counted and self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            self.over_limit += 1
            response = _too_many(method, "Too many concurrent requests.", retry_after=1)
            record.status = response.status
            return response
        if counted and self.max_per_second is not None and not self._within_rate():
            self.over_limit += 1
            response = _too_many(method, "Too many requests per second.", retry_after=1)
            record.status = response.status
            return response
        if counted:  # the concurrency the Files API would see from this client
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._route(request, method, endpoint, path, record.token)
        except FilesApiError as exc:
            response = exc.response(method)
        except ConnectionResetError:
            # The client gave up (its timeout) while the emulator was slow: nothing to answer.
            raise asyncio.CancelledError from None
        finally:
            if counted:
                self.in_flight -= 1
        record.status = response.status
        return response

    def _within_rate(self) -> bool:
        """True, and the call counted, when fewer than max_per_second started in the last second."""
        now = time.monotonic()
        started = self._started
        while started and started[0] <= now - 1.0:
            started.popleft()
        if self.max_per_second is not None and len(started) >= self.max_per_second:
            return False
        started.append(now)
        return True

    async def _route(
        self,
        request: web.Request,
        method: str,
        endpoint: Endpoint,
        path: str,
        token: str | None,
    ) -> web.StreamResponse:
        if endpoint == "metadata":
            return self._host_metadata()
        if endpoint == "oauth":
            return await self._oauth(request, path)
        if endpoint == "presigned":
            return await self._presigned_download(request, path)
        if endpoint == "other":
            raise FilesApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
        # The Files API proper: infrastructure faults first, as a load balancer would answer.
        fault = await self._apply_fault(method, path)
        if fault is not None:
            return fault
        if self.latency:
            await asyncio.sleep(self.latency)
        self._check_token(token)
        if endpoint == "download-url":
            return self._create_download_url(request)
        _check_path(path)
        if endpoint == "files":
            return await self._files(request, method, path)
        return self._directories(request, method, path)

    async def _apply_fault(self, method: str, path: str) -> web.StreamResponse | None:
        for fault in self.faults:
            if not fault.matches(method, path):
                continue
            if fault.kind == "cut":
                # Applied by the download itself, which knows the body.
                return None
            fault.remaining -= 1
            if fault.kind == "hang":
                await self._stopping.wait()
                raise FilesApiError(503, "TEMPORARILY_UNAVAILABLE", "The emulator is stopping.")
            if fault.kind == "throttle":
                message = "Too many requests. Please try again later."
                return _too_many(method, message, retry_after=fault.retry_after)
            return FilesApiError(
                fault.status, _error_code_for(fault.status), "Injected failure."
            ).response(method)
        return None

    def _take_cut(self, method: str, path: str) -> bool:
        for fault in self.faults:
            if fault.kind == "cut" and fault.matches(method, path):
                fault.remaining -= 1
                return True
        return False

    def _check_token(self, token: str | None) -> None:
        if token is None:
            raise FilesApiError(
                401,
                "UNAUTHENTICATED",
                "Credential was not sent or was of an unsupported type for this API.",
            )
        if token not in self.tokens and token not in self.issued_tokens:
            raise FilesApiError(403, "PERMISSION_DENIED", "Invalid access token.")

    # Files

    async def _files(self, request: web.Request, method: str, path: str) -> web.StreamResponse:
        if method == "PUT":
            return await self._upload(request, path)
        if method in ("GET", "HEAD"):
            return await self._download(request, method, path)
        if method == "DELETE":
            if self.files.pop(path, None) is None:
                raise _not_found(path)
            return web.Response(status=204)
        raise FilesApiError(405, "BAD_REQUEST", f"Method {method} is not allowed.")

    async def _upload(self, request: web.Request, path: str) -> web.StreamResponse:
        overwrite = request.query.get("overwrite", "true")
        if overwrite not in ("true", "false"):
            raise FilesApiError(400, "INVALID_PARAMETER_VALUE", "overwrite must be a boolean.")
        self._require_volume(path)
        if path in self.directories:
            raise FilesApiError(409, "RESOURCE_CONFLICT", f"A directory exists at {path}.")
        if overwrite == "false" and path in self.files:
            raise FilesApiError(409, "ALREADY_EXISTS", f"The file {path} already exists.")
        data = bytearray()
        async for chunk in request.content.iter_any():
            data.extend(chunk)
        self._make_parents(path)
        self.files[path] = StoredFile(bytes(data), time.time())
        return web.Response(status=204)

    async def _download(self, request: web.Request, method: str, path: str) -> web.StreamResponse:
        stored = self.files.get(path)
        if stored is None:
            raise _not_found(path)
        since = request.headers.get("If-Unmodified-Since")
        if since is not None and _modified_after(stored.modified, since):
            raise FilesApiError(
                412, "FAILED_PRECONDITION", "The file has been modified since the given time."
            )
        cut = method == "GET" and self._take_cut(method, path)
        if cut:
            # The status line goes out before the body is cut, and the handler never returns.
            request[_RECORD].status = 200
        return await self._send_file(request, stored, cut=cut)

    async def _send_file(
        self, request: web.Request, stored: StoredFile, *, cut: bool = False
    ) -> web.StreamResponse:
        size = len(stored.data)
        start, end = 0, size
        status = 200
        header = request.headers.get("Range")
        if header is not None:
            chosen = _parse_range(header, size)
            if chosen == "unsatisfiable":
                raise FilesApiError(
                    416, "INVALID_PARAMETER_VALUE", "The requested range is not satisfiable."
                )
            if chosen is not None:
                start, end = chosen
                status = 206
        response = web.StreamResponse(status=status)
        response.content_type = "application/octet-stream"
        response.content_length = end - start
        response.headers["Last-Modified"] = _http_date(stored.modified)
        if status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        body = stored.data[start:end]
        if cut:
            body = body[: len(body) // 2]
        for offset in range(0, len(body), self.chunk_size):
            if offset and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await response.write(body[offset : offset + self.chunk_size])
        if cut:
            # close() flushes what was written; the client then sees the body end early.
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        await response.write_eof()
        return response

    # Directories

    def _directories(self, request: web.Request, method: str, path: str) -> web.StreamResponse:
        if method == "PUT":
            self._require_volume(path)
            if path in self.files or any(p in self.files for p in _parents(path)):
                raise FilesApiError(409, "RESOURCE_CONFLICT", f"A file exists at {path}.")
            self._make_parents(path + "/x")
            return web.Response(status=200)
        if path not in self.directories:
            raise _not_found(path, "directory")
        if method == "HEAD":
            return web.Response(status=200)
        if method == "GET":
            return self._list(request, path)
        if method == "DELETE":
            if path in self.volumes:
                raise FilesApiError(400, "INVALID_PARAMETER_VALUE", "Cannot delete a volume root.")
            if self._children(path):
                raise FilesApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    f"The directory {path} is not empty.",
                    reason="FILES_API_DIRECTORY_IS_NOT_EMPTY",
                )
            self.directories.discard(path)
            return web.Response(status=200)
        raise FilesApiError(405, "BAD_REQUEST", f"Method {method} is not allowed.")

    def _list(self, request: web.Request, path: str) -> web.Response:
        try:
            page_size = int(request.query.get("page_size", MAX_PAGE_SIZE))
        except ValueError:
            raise FilesApiError(
                400, "INVALID_PARAMETER_VALUE", "page_size must be an integer."
            ) from None
        if page_size <= 0:
            page_size = MAX_PAGE_SIZE
        page_size = min(page_size, MAX_PAGE_SIZE, self.page_limit)
        children = self._children(path)
        after = _decode_page_token(request.query.get("page_token"), path)
        if after is not None:
            children = [c for c in children if c[0] > after]
        page, rest = children[:page_size], children[page_size:]
        contents: list[dict[str, Any]] = []
        for name, is_directory in page:
            child = f"{path}/{name}"
            entry: dict[str, Any] = {"path": child, "is_directory": is_directory, "name": name}
            if not is_directory:
                stored = self.files[child]
                entry["file_size"] = len(stored.data)
                entry["last_modified"] = int(stored.modified * 1000)
            contents.append(entry)
        body: dict[str, Any] = {}
        if contents:
            body["contents"] = contents
        if rest:
            body["next_page_token"] = _encode_page_token(path, page[-1][0])
        return web.json_response(body)

    def _children(self, path: str) -> list[tuple[str, bool]]:
        prefix = path + "/"
        names: dict[str, bool] = {}
        for directory in self.directories:
            if directory.startswith(prefix) and "/" not in directory[len(prefix) :]:
                names[directory[len(prefix) :]] = True
        for file_path in self.files:
            if file_path.startswith(prefix) and "/" not in file_path[len(prefix) :]:
                names[file_path[len(prefix) :]] = False
        return sorted(names.items())

    def _require_volume(self, path: str) -> None:
        if not any(path == v or path.startswith(v + "/") for v in self.volumes):
            raise _not_found(path, "volume")

    def _make_parents(self, path: str) -> None:
        for parent in _parents(path):
            if any(parent == v or parent.startswith(v + "/") for v in self.volumes):
                if parent in self.files:
                    raise FilesApiError(409, "RESOURCE_CONFLICT", f"A file exists at {parent}.")
                self.directories.add(parent)

    # Presigned downloads (the SDK's default download path)

    def _create_download_url(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            raise FilesApiError(405, "BAD_REQUEST", "Use POST.")
        path = request.query.get("path", "")
        _check_path(path)
        if path not in self.files:
            raise _not_found(path)
        signature = secrets.token_urlsafe(24)
        self._presigned[signature] = _Presigned(path, time.time() + 3600)
        return web.json_response({"url": f"{self.url}{PRESIGNED_PREFIX}{signature}", "headers": []})

    async def _presigned_download(self, request: web.Request, signature: str) -> web.StreamResponse:
        grant = self._presigned.get(signature)
        if grant is None or grant.expires < time.time():
            raise FilesApiError(403, "PERMISSION_DENIED", "Invalid or expired signature.")
        stored = self.files.get(grant.path)
        if stored is None:
            raise _not_found(grant.path)
        return await self._send_file(request, stored)

    # Workspace metadata and OAuth

    def _host_metadata(self) -> web.Response:
        return web.json_response(
            {
                "oidc_endpoint": f"{self.url}/oidc",
                "account_id": self.account_id,
                "workspace_id": self.workspace_id,
                "cloud": "aws",
            }
        )

    async def _oauth(self, request: web.Request, path: str) -> web.Response:
        if path == "/oidc/.well-known/oauth-authorization-server":
            return web.json_response(
                {
                    "issuer": f"{self.url}/oidc",
                    "authorization_endpoint": f"{self.url}/oidc/v1/authorize",
                    "token_endpoint": f"{self.url}/oidc/v1/token",
                    "grant_types_supported": ["client_credentials", "authorization_code"],
                }
            )
        if path == "/oidc/v1/token" and request.method == "POST":
            return await self._token(request)
        raise FilesApiError(404, "ENDPOINT_NOT_FOUND", f"No OAuth endpoint at {path}")

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id, client_secret = _basic_credentials(request)
        client_id = client_id or str(form.get("client_id", ""))
        client_secret = client_secret or str(form.get("client_secret", ""))
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "Only client_credentials.")
        if not client_id or self.clients.get(client_id) != client_secret:
            return _oauth_error(401, "invalid_client", "Client authentication failed.")
        access_token = f"oauth-{secrets.token_urlsafe(24)}"
        if self.on_token_issued is not None:
            await self.on_token_issued(access_token, self.token_lifetime_seconds)
        self.issued_tokens[access_token] = client_id
        return web.json_response(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": self.token_lifetime_seconds,
                "scope": str(form.get("scope", "all-apis")),
            }
        )


def _too_many(method: str, message: str, *, retry_after: int) -> web.Response:
    """429 REQUEST_LIMIT_EXCEEDED with Retry-After, as the Files API throttles."""
    response = FilesApiError(429, "REQUEST_LIMIT_EXCEEDED", message).response(method)
    response.headers["Retry-After"] = str(retry_after)
    return response


def _classify(raw_path: str) -> tuple[Endpoint, str]:
    prefixes: tuple[tuple[str, Endpoint], ...] = (
        (FILES_PREFIX, "files"),
        (DIRECTORIES_PREFIX, "directories"),
    )
    for prefix, endpoint in prefixes:
        if raw_path.startswith(prefix + "/"):
            # Both one encoded path (SDK: `quote`) and %2F separators (CLI: PathEscape) decode here.
            path = unquote(raw_path[len(prefix) :])
            if path.startswith("//"):
                path = path[1:]
            return endpoint, path
    if raw_path == DOWNLOAD_URL_PATH:
        return "download-url", raw_path
    if raw_path.startswith(PRESIGNED_PREFIX):
        return "presigned", raw_path[len(PRESIGNED_PREFIX) :]
    if raw_path == "/.well-known/databricks-config":
        return "metadata", raw_path
    if raw_path.startswith("/oidc/"):
        return "oauth", raw_path
    return "other", unquote(raw_path)


def _check_path(path: str) -> None:
    segments = path.split("/")
    if not path.startswith("/") or any(s in ("", ".", "..") for s in segments[1:]):
        raise FilesApiError(400, "INVALID_PARAMETER_VALUE", f"Invalid path: {path!r}")


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(2, len(parts))]


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _basic_credentials(request: web.Request) -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(value.strip()).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    client_id, _, client_secret = decoded.partition(":")
    return unquote(client_id), unquote(client_secret)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _error_code_for(status: int) -> str:
    return {
        500: "INTERNAL_ERROR",
        502: "BAD_GATEWAY",
        503: "TEMPORARILY_UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """(start, end exclusive) for one byte range; None to ignore the header (serve it all)."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = size if not last else min(int(last) + 1, size)
    if end <= start:
        return None
    return start, end


def _http_date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC), usegmt=True)


def _modified_after(modified: float, header: str) -> bool:
    try:
        since = parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return False
    # HTTP dates have whole seconds.
    return int(modified) > since


def _encode_page_token(path: str, last_name: str) -> str:
    raw = json.dumps({"d": path, "after": last_name}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_page_token(token: str | None, path: str) -> str | None:
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if data["d"] != path:
            raise ValueError("page token of another directory")
        return str(data["after"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise FilesApiError(400, "INVALID_PARAMETER_VALUE", "Invalid page token.") from None
