"""The speak misses' HTTP/1.1 client against raw sockets: framing, reuse, failures, limits."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from yarl import URL

from proxy.upstreams.h1 import H1Error, H1Pool, H1Response

Answer = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 whose every connection runs `answer` until it returns."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def origin(self) -> URL:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.answer(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def answer_with(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes
    ) -> None:
        """Read one request, write `response`."""
        await self.read_request(reader)
        writer.write(response)
        await writer.drain()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request (head and Content-Length body), recorded."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def keep_alive(*responses: bytes) -> Answer:
    """Answer requests on one connection with `responses` in turn, then wait for the close."""

    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        for response in responses:
            await server.answer_with(reader, writer, response)
        await reader.read()

    return answer


def pool(origin: URL, **options: float) -> H1Pool:
    return H1Pool(
        origin,
        limit=int(options.get("limit", 10)),
        connect_timeout=options.get("connect_timeout", 2.0),
        read_timeout=options.get("read_timeout", 2.0),
    )


async def body_of(response: H1Response) -> bytes:
    try:
        return response.read_buffered() + b"".join([c async for c in response.iter_chunks()])
    finally:
        response.close()


Serve = Callable[[Answer], Awaitable[RawServer]]
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: 5\r\n\r\nhello"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[RawServer]]]:
    started: list[RawServer] = []

    async def start(answer: Answer) -> RawServer:
        server = RawServer(answer)
        started.append(await server.__aenter__())
        return server

    yield start
    for server in started:
        await server.__aexit__()


async def test_requests_reuse_one_kept_alive_connection(serve: Serve) -> None:
    server = await serve(keep_alive(OK_HELLO, OK_HELLO, OK_HELLO))
    client = pool(server.origin)
    for _ in range(3):
        response = await client.request("POST", "/api/tts/speak", [("X-A", "1")], b"{}")
        assert response.status == 200 and response.headers["Content-Type"] == "audio/mpeg"
        assert await body_of(response) == b"hello"
    await client.aclose()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /api/tts/speak HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nX-A: 1\r\n" in first and first.endswith(b"Content-Length: 2\r\n\r\n{}")


async def test_caller_headers_cannot_frame_the_request(serve: Serve) -> None:
    server = await serve(keep_alive(OK_HELLO))
    client = pool(server.origin)
    headers = [("Host", "evil"), ("Content-Length", "999"), ("Transfer-Encoding", "chunked")]
    assert await body_of(await client.request("POST", "/s", headers, b"abc")) == b"hello"
    await client.aclose()
    request = server.requests[0].lower()
    assert b"evil" not in request and b"999" not in request and b"chunked" not in request
    with pytest.raises(H1Error) as refused:
        await client.request("POST", "/s", [("X-A", "1\r\nX-Injected: 1")], b"")
    assert refused.value.status == 502


async def test_chunked_and_interim_responses_are_decoded(serve: Serve) -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-TTS-Provider: replicate\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    server = await serve(keep_alive(chunked, OK_HELLO))
    client = pool(server.origin)
    response = await client.request("POST", "/s", [], b"")
    assert response.status == 200 and response.headers["X-TTS-Provider"] == "replicate"
    assert await body_of(response) == b"abcdefg"
    assert await body_of(await client.request("POST", "/s", [], b"")) == b"hello"
    await client.aclose()
    assert server.connections == 1


async def test_a_body_without_framing_ends_with_the_connection(serve: Serve) -> None:
    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.answer_with(
            reader, writer, b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\n\r\nRIFF"
        )
        await asyncio.sleep(0.05)
        writer.write(b"data")

    server = await serve(answer)
    client = pool(server.origin)
    assert await body_of(await client.request("POST", "/s", [], b"")) == b"RIFFdata"
    assert await body_of(await client.request("POST", "/s", [], b"")) == b"RIFFdata"
    await client.aclose()
    assert server.connections == 2  # such a connection cannot be reused


async def test_a_body_cut_short_raises_and_the_connection_is_dropped(
    serve: Serve,
) -> None:
    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    server = await serve(answer)
    client = pool(server.origin)
    response = await client.request("POST", "/s", [], b"")
    with pytest.raises(H1Error) as broken:
        await body_of(response)
    assert broken.value.status == 502
    await client.aclose()


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once(
    serve: Serve,
) -> None:
    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.answer_with(reader, writer, OK_HELLO)
        if server.connections == 1:
            # The first connection is closed after a read of the next request, unanswered:
            # what a server closing an idle connection looks like to the client.
            await reader.read(1)
            return
        await server.answer_with(reader, writer, OK_HELLO)
        await reader.read()

    server = await serve(answer)
    client = pool(server.origin)
    assert await body_of(await client.request("POST", "/s", [], b"one")) == b"hello"
    assert await body_of(await client.request("POST", "/s", [], b"two")) == b"hello"
    await client.aclose()
    assert server.connections == 2
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in server.requests] == [b"one", b"two"]


async def test_silence_past_the_read_timeout_is_a_504(serve: Serve) -> None:
    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    server = await serve(answer)
    client = pool(server.origin, read_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(H1Error) as timed_out:
        await client.request("POST", "/s", [], b"")
    assert timed_out.value.status == 504 and timed_out.value.timeout
    assert 0.15 < loop.time() - started < 1.5
    await client.aclose()


async def test_a_refused_connection_and_a_malformed_answer_are_502s(
    serve: Serve,
) -> None:
    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.answer_with(reader, writer, b"HTTP/1.1 2OO OK\r\nbroken\r\n\r\n")
        await reader.read()

    server = await serve(answer)
    client = pool(server.origin)
    with pytest.raises(H1Error) as malformed:
        await client.request("POST", "/s", [], b"")
    assert malformed.value.status == 502
    await client.aclose()
    dead = pool(URL("http://127.0.0.1:9"))  # nothing listens on the discard port here
    with pytest.raises(H1Error) as refused:
        await dead.request("POST", "/s", [], b"")
    assert refused.value.status == 502
    assert refused.value.detail == "upstream unavailable (ConnectionRefusedError)"


async def test_no_more_exchanges_than_the_limit_at_once(serve: Serve) -> None:
    release = asyncio.Event()

    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:  # until the client closes (IncompleteReadError)
            await server.read_request(reader)
            await release.wait()
            writer.write(OK_HELLO)
            await writer.drain()

    server = await serve(answer)
    client = pool(server.origin, limit=2)
    calls = [asyncio.create_task(client.request("POST", "/s", [], b"")) for _ in range(3)]
    await asyncio.sleep(0.2)
    assert len(server.requests) == 2  # the third waits for a slot
    release.set()
    for call in calls[:2]:
        assert await body_of(await call) == b"hello"
    assert await body_of(await asyncio.wait_for(calls[2], 2)) == b"hello"
    await client.aclose()


async def test_a_large_body_read_slowly_arrives_whole(serve: Serve) -> None:
    size = 6 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await server.answer_with(
            reader, writer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + payload
        )
        await reader.read()

    server = await serve(answer)
    client = pool(server.origin, read_timeout=0.3)
    response = await client.request("POST", "/s", [], b"")
    parts = [response.read_buffered()]
    async for chunk in response.iter_chunks():
        parts.append(chunk)
        if len(parts) == 2:
            await asyncio.sleep(0.6)  # longer than the read timeout: paused reading is not silence
    response.close()
    assert b"".join(parts) == payload
    await client.aclose()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_an_https_origin_is_spoken_to_over_tls(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK_HELLO)
        await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_side)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    client = H1Pool(
        URL(f"https://127.0.0.1:{port}"),
        limit=2,
        connect_timeout=2.0,
        read_timeout=2.0,
        ssl_context=trusting,
    )
    try:
        assert await body_of(await client.request("POST", "/s", [], b"")) == b"hello"
        untrusting = H1Pool(
            URL(f"https://127.0.0.1:{port}"), limit=2, connect_timeout=2.0, read_timeout=2.0
        )
        with pytest.raises(H1Error) as refused:  # not a certificate the system trusts
            await untrusting.request("POST", "/s", [], b"")
        assert refused.value.status == 502
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert seen[0].startswith(b"POST /s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)


async def test_bytes_past_the_answer_retire_the_connection(serve: Serve) -> None:
    async def answer(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:  # every answer followed by a stray second one
            await server.answer_with(reader, writer, OK_HELLO + OK_HELLO)

    server = await serve(answer)
    client = pool(server.origin)
    for _ in range(3):
        assert await body_of(await client.request("POST", "/s", [], b"")) == b"hello"
    await client.aclose()
    assert server.connections == 3 and len(server.requests) == 3
