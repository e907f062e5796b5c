"""Log plumbing: LineWriter (lines written from a thread), and quiet malformed requests."""

from __future__ import annotations

import atexit
import logging
import threading
from collections import deque
from typing import Final, TextIO

MAX_QUEUED_LINES: Final = 10_000
FLUSH_SECONDS: Final = 0.1


class LineWriter(logging.Handler):
    """Appends lines to a bounded queue (oldest dropped when full); a thread writes them in batches.

    The event loop only appends to a deque: no syscall, no lock it could wait on, so a slow or
    blocked stderr never stalls serving. `put` takes a finished line without a LogRecord.
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
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._flush_seconds = flush_seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def put(self, line: str) -> None:
        """Queue one finished line."""
        self._lines.append(line)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue a record logged the ordinary way, formatted."""
        self._lines.append(self.format(record))

    def flush(self) -> None:
        """Write what is queued now (the writer thread does this every flush_seconds)."""
        batch: list[str] = []
        lines = self._lines
        while lines:
            try:
                batch.append(lines.popleft())
            except IndexError:
                break
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
            self.flush()


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
