"""The Databricks Files API: one call path (deadline, retries, backoff), one listing."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy

from proxy.storage.databricks.limiter import READ, WRITE, CallLimiter
from proxy.storage.tiers import VolumeUnavailable

FILES_API: Final = "/api/2.0/fs/files"
DIRECTORIES_API: Final = "/api/2.0/fs/directories"
RETRYABLE_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
READ_CHUNK_BYTES: Final = 64 * 1024
_BACKOFF_BASE_SECONDS: Final = 0.1
_BACKOFF_CAP_SECONDS: Final = 2.0
_ERROR_BODY_LIMIT: Final = 65_536
_LISTING_LIMIT: Final = 16 * 1_048_576
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

logger = logging.getLogger(__name__)


class VolumeRequestFailed(Exception):
    """The Files API refused a call with a status that retrying will not change."""

    def __init__(self, method: str, status: int, error_code: str = "") -> None:
        # Status and error code only: the API's message and the URL may carry the raw ids.
        super().__init__(f"Files API {method} answered {status} {error_code}".rstrip())
        self.status = status
        self.error_code = error_code


@dataclass(frozen=True, slots=True)
class Call:
    """One guarded operation: where, with which credentials, until when; the key hash for logs."""

    host: str
    headers: Mapping[str, str]
    deadline: float
    digest: str
    # A lookup's answer is due by then: each attempt's response head (the body by `deadline`).
    answer_by: float | None = None

    def answer_only(self) -> Call:
        """This call with all of it due by `answer_by` (a small reply read with its head)."""
        return self if self.answer_by is None else replace(self, deadline=self.answer_by)


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: its status, headers and bounded body, or the live response to stream."""

    status: int
    headers: CIMultiDictProxy[str]
    # None when the body was larger than the limit the caller allowed.
    body: bytes | None
    # A live response whose body the caller streams (and must release).
    response: aiohttp.ClientResponse | None = None


@dataclass(frozen=True, slots=True)
class ListedFile:
    """A file in one folder's listing: its size and modification time, when the API says."""

    size: int | None
    modified: float | None


@dataclass(frozen=True, slots=True)
class FolderListing:
    """One folder's files by name, and its subfolders' paths."""

    files: dict[str, ListedFile]
    folders: list[str]


class FilesApi:
    """Files API calls within a call's deadline, retried on 429/5xx and connection errors."""

    def __init__(
        self,
        *,
        retries: int,
        session: aiohttp.ClientSession | None = None,
        jitter: Callable[[], float] = random.random,
        on_unauthorized: Callable[[], None] = lambda: None,
        limiter: CallLimiter | None = None,
    ) -> None:
        self.retries = max(0, retries)
        # One limiter for every call of the process: the workspace's budget is shared.
        self.limiter = limiter or CallLimiter(concurrency=8, rate=80.0)
        # Attempts by method and outcome (2xx, 404, 4xx, 429, 5xx, error), for the metrics.
        self.calls: Counter[tuple[str, str]] = Counter()
        self._session = session
        self._owns_session = session is None
        self._jitter = jitter
        self._on_unauthorized = on_unauthorized

    async def aclose(self) -> None:
        """Close the HTTP session this client opened."""
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def exchange(
        self,
        call: Call,
        method: str,
        api: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        limit: int = _ERROR_BODY_LIMIT,
        stream: bool = False,
    ) -> Reply:
        """One Files API call, retried on 429/5xx and connection errors within the call's deadline.

        Returns the first answer that retrying would not change (2xx, 404, other 4xx). Each
        attempt's response head is due by the call's `answer_by` when it has one.
        """
        # quote() keeps "/" and escapes the rest, as databricks-sdk does for these paths.
        url = f"{call.host}{api}{quote(path)}"
        request_headers = {**call.headers, **(headers or {})}
        loop = asyncio.get_running_loop()
        head_by = call.deadline if call.answer_by is None else min(call.answer_by, call.deadline)
        attempt = 0
        while True:
            now = loop.time()
            remaining = call.deadline - now
            if remaining <= 0 or head_by <= now:
                raise VolumeUnavailable(f"Files API {method} timed out")
            retry_after: float | None = None
            priority = READ if method in ("GET", "HEAD") else WRITE
            try:
                async with self.limiter.slot(priority, until=head_by):
                    async with asyncio.timeout(remaining):
                        reply = await self._attempt(
                            method, url, request_headers, params, data, limit, stream, head_by
                        )
            except TimeoutError as exc:
                if loop.time() >= head_by:
                    raise VolumeUnavailable(f"Files API {method} had no answer in time") from exc
                self.calls[(method, "error")] += 1
                reason = type(exc).__name__
            except aiohttp.ClientError as exc:
                self.calls[(method, "error")] += 1
                reason = type(exc).__name__
            else:
                self.calls[(method, _outcome(reply.status))] += 1
                if reply.status == 429:
                    # The workspace is over its budget: every call of this process waits.
                    self.limiter.pause(_retry_after(reply.headers) or self._backoff(attempt + 1))
                if reply.status not in RETRYABLE_STATUSES:
                    if reply.status == 401:
                        self._on_unauthorized()
                    return reply
                reason = str(reply.status)
                retry_after = _retry_after(reply.headers)
            attempt += 1
            if attempt > self.retries:
                raise VolumeUnavailable(
                    f"Files API {method} failed after {attempt} attempts ({reason})"
                )
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            if loop.time() + delay >= head_by:
                raise VolumeUnavailable(f"Files API {method} failed ({reason}); no time to retry")
            logger.debug(
                "volume %s retry %d in %.2fs after %s for %s",
                method,
                attempt,
                delay,
                reason,
                call.digest,
            )
            await asyncio.sleep(delay)

    async def upload(self, call: Call, path: str, data: bytes) -> None:
        """Write `data` to the file at `path`, replacing what was there."""
        reply = await self.exchange(
            call,
            "PUT",
            FILES_API,
            path,
            params={"overwrite": "true"},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        check(reply, "PUT")

    async def delete_file(self, call: Call, path: str) -> None:
        """Remove the file at `path`; one already gone is no error."""
        reply = await self.exchange(call, "DELETE", FILES_API, path)
        if reply.status != 404:
            check(reply, "DELETE")

    async def delete_directory(self, call: Call, path: str) -> None:
        """Remove the empty folder at `path`; one gone, or written into meanwhile, is kept quiet."""
        reply = await self.exchange(call, "DELETE", DIRECTORIES_API, path)
        # 404: already gone; 400: not empty, because someone wrote into it meanwhile.
        if reply.status not in (400, 404):
            check(reply, "DELETE")

    async def listing(self, call: Call, folder: str) -> FolderListing | None:
        """One folder's files and subfolders (every page), or None when it does not exist."""
        files: dict[str, ListedFile] = {}
        folders: list[str] = []
        page_token: str | None = None
        while True:
            page = await self._list_page(call, folder, page_token)
            if page is None:
                return None
            contents, page_token = page
            for item in contents:
                path = item.get("path")
                if not isinstance(path, str) or not path.startswith(folder + "/"):
                    continue
                name = path[len(folder) + 1 :]
                if not name or "/" in name:
                    continue
                if item.get("is_directory"):
                    folders.append(path)
                else:
                    files[name] = ListedFile(
                        _number(item.get("file_size")), _seconds(item.get("last_modified"))
                    )
            if not page_token:
                return FolderListing(files, folders)

    async def _list_page(
        self, call: Call, folder: str, page_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None] | None:
        """One page of a folder's listing and the next page's token, or None when it is gone."""
        params = {"page_token": page_token} if page_token else None
        reply = await self.exchange(
            call, "GET", DIRECTORIES_API, folder, params=params, limit=_LISTING_LIMIT
        )
        if reply.status == 404:
            return None
        check(reply, "GET")
        try:
            data = json.loads(reply.body or b"{}")
        except ValueError:
            raise VolumeRequestFailed("GET", reply.status, "MALFORMED_LISTING") from None
        if not isinstance(data, dict):
            raise VolumeRequestFailed("GET", reply.status, "MALFORMED_LISTING")
        contents = [item for item in data.get("contents", []) if isinstance(item, dict)]
        token = data.get("next_page_token")
        return contents, token if isinstance(token, str) and token else None

    async def _attempt(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        data: bytes | None,
        limit: int,
        stream: bool,
        head_by: float,
    ) -> Reply:
        async with asyncio.timeout_at(head_by):
            response = await self._client_session().request(
                method, url, headers=headers, params=params, data=data, allow_redirects=False
            )
        if stream and response.status == 200:
            # The caller streams the body and releases the response.
            return Reply(response.status, response.headers, b"", response)
        try:
            if method == "HEAD":
                body: bytes | None = b""
            else:
                bound = limit if response.status < 300 else _ERROR_BODY_LIMIT
                body = await _read_body_bounded(response, bound)
            return Reply(response.status, response.headers, body)
        finally:
            response.release()

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                headers={"User-Agent": "tts-cache-proxy databricks-volume"},
            )
            self._owns_session = True
        return self._session

    def _backoff(self, attempt: int) -> float:
        ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + self._jitter() / 2)


def _outcome(status: int) -> str:
    if status in (404, 429):
        return str(status)
    return f"{status // 100}xx"


def check(reply: Reply, method: str) -> None:
    """Raise VolumeRequestFailed for an answer that is not a success."""
    if 200 <= reply.status < 300:
        return
    raise VolumeRequestFailed(method, reply.status, _error_code(reply.body))


def _error_code(body: bytes | None) -> str:
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    code = data.get("error_code") if isinstance(data, dict) else None
    # Only a well-formed code: it goes into an exception message.
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


async def _read_body_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit`."""
    if response.content_length is not None and response.content_length > limit:
        return None
    data = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        data.extend(chunk)
        if len(data) > limit:
            return None
    return bytes(data)


def _retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _number(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _seconds(milliseconds: Any) -> float | None:
    number = _number(milliseconds)
    return number / 1000 if number is not None else None
