"""Log plumbing: LineWriter (lines written from a thread), and quiet malformed requests."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TextIO

MAX_QUEUED_LINES: Final = 10_000
FLUSH_SECONDS: Final = 0.1
# Lines the writer thread makes before it lets the event loop have the GIL.
PAUSE_EVERY_LINES: Final = 64


# A line to be made by the writer thread: a function and the plain values it is made from.
Deferred = tuple[Callable[..., str], tuple[Any, ...]]


class LineWriter(logging.Handler):
    """Appends lines to a bounded queue (oldest dropped when full); a thread writes them in batches.

    The event loop only appends to a deque: no syscall, no lock it could wait on, so a slow or
    blocked stderr never stalls serving. `put` takes a finished line without a LogRecord; `defer`
    takes the values of a line, which the thread formats with the rest of its batch (formatting a
    thousand lines in a row costs a fraction of formatting each between two requests).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        max_lines: int = MAX_QUEUED_LINES,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        super().__init__()
        self._stream = stream
        self._lines: deque[str | Deferred] = deque(maxlen=max_lines)
        self.format_errors = 0
        self._flush_seconds = flush_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def put(self, line: str) -> None:
        """Queue one finished line."""
        self._lines.append(line)

    def defer(self, make: Callable[..., str], values: tuple[Any, ...]) -> None:
        """Queue the line `make(*values)`, made by the writer thread; `values` must be plain
        data (strings, numbers), never an object the event loop goes on changing."""
        self._lines.append((make, values))

    def emit(self, record: logging.LogRecord) -> None:
        """Queue a record logged the ordinary way, formatted."""
        self._lines.append(self.format(record))

    def flush(self) -> None:
        """Write what is queued now (the writer thread does this every flush_seconds)."""
        self._write_queued(pause_every=0)

    def _write_queued(self, *, pause_every: int) -> None:
        """Make and write the queued lines; every `pause_every` lines made (0: never), let the
        event loop have the GIL, so that a large batch never holds it for long."""
        batch: list[str] = []
        lines = self._lines
        made = 0
        while lines:
            try:
                item = lines.popleft()
            except IndexError:
                break
            if isinstance(item, str):
                batch.append(item)
                continue
            make, values = item
            try:
                batch.append(make(*values))
            except Exception:  # a line that cannot be made is dropped, never the writer
                self.format_errors += 1
            made += 1
            if pause_every and made % pause_every == 0:
                time.sleep(0)  # releases the GIL to a waiting thread
        if not batch:
            return
        try:
            self._stream.write("\n".join(batch) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: nothing left to tell

    def close(self) -> None:
        """Stop the thread and write what is left."""
        if not self._stopping.is_set():
            self._stopping.set()
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=2)
            self.flush()
        super().close()

    def _run(self) -> None:
        while not self._stopping.wait(self._flush_seconds):
            self._write_queued(pause_every=PAUSE_EVERY_LINES)


class MalformedRequests(logging.Filter):
    """aiohttp's server logs a request it cannot parse at ERROR, with a traceback quoting the raw
    bytes; such a request is the client's fault, so it becomes one INFO line naming the peer and
    the kind of fault, and neither the traceback nor the bytes (they may carry anything)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a parse failure's record in place; let every other record through as it is."""
        from aiohttp.http_exceptions import BadHttpMessage

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed request from %s: %s", (peer, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_malformed_requests() -> None:
    """Install MalformedRequests on aiohttp's server logger (idempotent)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
