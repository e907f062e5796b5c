"""The upstream connection: aiohttp's client protocol, with interim responses handed on and a
response followed by bytes past its end still read (RFC 9110 15.2, RFC 9112 6.3)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import HttpProcessingError, RawResponseMessage
from aiohttp.http_parser import HttpResponseParserPy
from aiohttp.streams import StreamReader

log = logging.getLogger(__name__)

InterimHandler = Callable[[RawResponseMessage], Awaitable[None]]
ParsedMessages = list[tuple[RawResponseMessage, StreamReader]]

# Who receives the interim responses of the request the current task is making.
_INTERIM: contextvars.ContextVar[InterimHandler | None] = contextvars.ContextVar(
    "interim_handler", default=None
)
# Bytes a response's head may span before the recovery below gives up on it.
RECOVERY_LIMIT_BYTES: Final = 1 << 20


class InterimResponsesTo:
    """Within `with InterimResponsesTo(handler):`, the 1xx responses to the requests this task
    makes are handed to `handler` as they arrive."""

    __slots__ = ("_handler", "_token")

    def __init__(self, handler: InterimHandler) -> None:
        self._handler = handler
        self._token: contextvars.Token[InterimHandler | None] | None = None

    def __enter__(self) -> None:
        self._token = _INTERIM.set(self._handler)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _INTERIM.reset(self._token)


def is_interim(code: int) -> bool:
    """A 1xx status other than 101, which ends HTTP/1.1 on the connection (RFC 9110 15.2)."""
    return 100 <= code < 200 and code != 101


class UpstreamConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, its connections spoken by `UpstreamProtocol`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp has no public way to choose the protocol; this is the attribute it builds
        # every connection's protocol from.
        protocol = functools.partial(UpstreamProtocol, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", protocol)


class UpstreamProtocol(ResponseHandler):
    """aiohttp's response protocol; interim responses are handed on, excess bytes discarded."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._response_params: dict[str, Any] = {}
        self._settled_parser: object = None

    def read(self) -> Coroutine[Any, Any, tuple[RawResponseMessage, StreamReader]]:
        """The next response; an interim one is handed on first.

        aiohttp reads the interim responses and drops them, where a proxy MUST forward them
        (RFC 9110 15.2). This runs in the task making the request, so the handler is its own.
        """
        handler = _INTERIM.get()
        if handler is None:
            return super().read()
        return self._read_handing_on(handler)

    async def _read_handing_on(
        self, handler: InterimHandler
    ) -> tuple[RawResponseMessage, StreamReader]:
        message, payload = await super().read()
        if is_interim(message.code):
            await handler(message)
        return message, payload

    def set_response_params(self, **kwargs: Any) -> None:
        """Prepare for the next response, remembering how to parse it."""
        self._response_params = kwargs
        super().set_response_params(**kwargs)

    def data_received(self, data: bytes) -> None:
        """Parse `data`; until a response's head is read, past excess bytes if need be."""
        parser = self._parser
        if parser is None or parser is self._settled_parser:
            super().data_received(data)
            return
        tolerant: ExcessTolerantParser
        if isinstance(parser, ExcessTolerantParser):
            tolerant = parser
        else:
            tolerant = ExcessTolerantParser(parser, self, self._loop, self._response_params)
            self._parser = cast(Any, tolerant)  # it answers all aiohttp asks of a parser
        super().data_received(data)
        settled = tolerant.settled
        if settled is not None:
            # aiohttp's parser delivered the final response: it reads the rest alone.
            self._parser = self._settled_parser = settled


class ExcessTolerantParser:
    """aiohttp's response parser, and a second reading when it rejects bytes after a response.

    aiohttp's C parser rejects any read holding bytes past the end of a complete response (a
    Content-Length shorter than what was sent, content on a 304 or a HEAD response), and the
    response is lost with them: the client would get a 502 for an answer it would have had
    directly. Only then, the bytes since this response began are read again by aiohttp's own
    pure-Python parser, told to stop after each message: a complete final response is
    delivered, what follows it is discarded and the connection closed, since where the next
    response starts is unknown (RFC 9112 6.3: a client MAY discard it, and MUST NOT take it for
    a response). A response the C parser accepts is never read twice.
    """

    def __init__(
        self,
        parser: Any,
        protocol: UpstreamProtocol,
        loop: asyncio.AbstractEventLoop,
        params: dict[str, Any],
    ) -> None:
        self._parser = parser
        self._protocol = protocol
        self._loop = loop
        self._params = params
        self._seen: list[bytes] = []
        self._seen_bytes = 0
        self._interim_delivered = 0
        self._final_delivered = False
        self._discarding = False

    def feed_data(self, data: bytes) -> tuple[ParsedMessages, bool, bytes]:
        """Parse `data` as aiohttp does; recover the response when excess bytes broke it."""
        if self._discarding:
            return [], False, b""
        watching = not self._final_delivered and self._seen_bytes <= RECOVERY_LIMIT_BYTES
        if watching:
            self._seen.append(data)
            self._seen_bytes += len(data)
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except HttpProcessingError:
            if not watching or self._seen_bytes > RECOVERY_LIMIT_BYTES:
                raise
            recovered = self._read_again()
            if recovered is None:
                raise
            log.warning("upstream sent bytes past the end of its response: discarded")
            return recovered, False, b""
        for message, _ in messages:
            if is_interim(message.code):
                self._interim_delivered += 1
            else:
                self._final_delivered = True
                self._seen.clear()
        return messages, upgraded, tail

    @property
    def settled(self) -> Any:
        """aiohttp's parser, once it delivered the final response by itself; else None."""
        return self._parser if self._final_delivered and not self._discarding else None

    def _read_again(self) -> ParsedMessages | None:
        """The interim responses not yet delivered and a complete final response, read by the
        pure-Python parser from the bytes seen; None unless bytes are left past its end."""
        params = self._params
        parser = HttpResponseParserPy(
            self._protocol,
            self._loop,
            params.get("read_bufsize", 2**16),
            timer=params.get("timer"),
            payload_exception=aiohttp.ClientPayloadError,
            response_with_body=not params.get("skip_payload", False),
            read_until_eof=params.get("read_until_eof", False),
            auto_decompress=params.get("auto_decompress", True),
            max_line_size=params.get("max_line_size", 8190),
            max_field_size=params.get("max_field_size", 8190),
            max_headers=params.get("max_headers", 128),
            # Stop after each message: what follows the final response is never parsed.
            max_msg_queue_size=1,
        )
        self._discarding = True  # the C parser's half-read payload is nobody's now
        data = b"".join(self._seen)
        self._seen.clear()
        messages: ParsedMessages = []
        try:
            while not messages or is_interim(messages[-1][0].code):
                batch, _, _ = parser.feed_data(data)
                if not batch:
                    return None
                messages.extend(batch)
                parser.message_consumed()
                data = b""
        except HttpProcessingError:
            return None
        _, payload = messages[-1]
        # The pure-Python parser keeps what follows a message it stopped after in _tail.
        if not payload.is_eof() or not parser._tail:
            return None
        self._protocol.force_close()
        return messages[self._interim_delivered :]

    def feed_eof(self) -> Any:
        """The end of the connection, as aiohttp's parser sees it (nothing, once read again)."""
        if self._discarding:
            return None
        return self._parser.feed_eof()

    def pause_reading(self) -> None:
        """Flow control from the body's reader (a body read again is already read whole)."""
        if not self._discarding:
            self._parser.pause_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)
