"""A Volume hit streamed as it arrives, its last chunk held back until the digest matches."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import aiohttp

from proxy.storage.entry import EntryMeta
from proxy.storage.tiers import CorruptEntry, VolumeUnavailable


class StreamedEntry:
    """A Volume hit whose body streams as it arrives, checked against its sidecar on the way.

    Every chunk but the last is yielded as soon as it is read; the last one is held until the
    length and sha256 match, and `CorruptEntry` is raised instead (`on_corrupt` told, which
    removes the entry) when they do not. Iterate once, then `aclose()` (also safe when the
    iteration stopped early).
    """

    def __init__(
        self,
        meta: EntryMeta,
        response: aiohttp.ClientResponse,
        *,
        chunk_size: int,
        read_timeout: float,
        on_corrupt: Callable[[], None],
        on_broken: Callable[[], None],
    ) -> None:
        self.meta = meta
        self._response = response
        self._chunk_size = chunk_size
        self._read_timeout = read_timeout
        self._on_corrupt = on_corrupt
        self._on_broken = on_broken
        self._iterator: AsyncGenerator[bytes, None] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The body; raises CorruptEntry rather than yield a final chunk that fails the check."""
        if self._iterator is not None:
            raise RuntimeError("a StreamedEntry can be iterated only once")
        self._iterator = self._chunks()
        return self._iterator

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        if self._iterator is not None:
            await self._iterator.aclose()
        self._release()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        expected = self.meta.length
        digest = hashlib.sha256()
        received = 0
        try:
            while True:
                chunk = await self._read()
                received += len(chunk)
                if not chunk or received > expected:
                    break
                digest.update(chunk)
                if received < expected:
                    yield chunk
                    continue
                # The final chunk: only released once the whole object is known to be intact.
                if digest.hexdigest() == self.meta.body_sha256 and not await self._read():
                    self._release()
                    yield chunk
                    return
                break
            if received == expected == 0 and digest.hexdigest() == self.meta.body_sha256:
                return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._on_broken()
            raise VolumeUnavailable(
                f"the Volume download broke off ({type(exc).__name__})"
            ) from None
        finally:
            self._release()
        self._on_corrupt()
        raise CorruptEntry("the Volume object failed its integrity check; entry removed")

    async def _read(self) -> bytes:
        async with asyncio.timeout(self._read_timeout):
            return await self._response.content.read(self._chunk_size)

    def _release(self) -> None:
        if self._response.closed:
            return
        if self._response.content.at_eof():
            self._response.release()
        else:
            # Bytes left unread: the connection cannot be reused.
            self._response.close()
