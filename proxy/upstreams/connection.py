"""The upstream connection: aiohttp's client protocol, with interim responses handed on
(RFC 9110 15.2)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader

InterimHandler = Callable[[RawResponseMessage], Awaitable[None]]

# Who receives the interim responses of the request the current task is making.
_INTERIM: contextvars.ContextVar[InterimHandler | None] = contextvars.ContextVar(
    "interim_handler", default=None
)


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
    """aiohttp's response protocol; interim responses are handed on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)

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
