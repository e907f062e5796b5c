"""LineWriter: lines queued by the event loop, written in batches by a thread."""

from __future__ import annotations

import io
import logging
import time

from proxy.log_lines import LineWriter


def test_lines_are_written_in_order_and_the_oldest_dropped_when_full() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream, max_lines=3, flush_seconds=60)
    try:
        for number in range(5):
            writer.put(f'{{"n":{number}}}')
        writer.flush()
        assert stream.getvalue() == '{"n":2}\n{"n":3}\n{"n":4}\n'
    finally:
        writer.close()


def test_records_logged_the_ordinary_way_are_formatted_and_close_writes_the_rest() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream, flush_seconds=60)
    writer.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tests.line_writer")
    logger.propagate = False
    logger.addHandler(writer)
    try:
        logger.warning("plain %s", "record")
        writer.close()
        assert stream.getvalue() == "plain record\n"
    finally:
        logger.removeHandler(writer)


def test_the_thread_writes_without_being_asked() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream, flush_seconds=0.01)
    try:
        writer.put("soon")
        for _ in range(200):
            if stream.getvalue():
                break
            time.sleep(0.01)
        assert stream.getvalue() == "soon\n"
    finally:
        writer.close()


def test_deferred_lines_are_made_by_the_writer_in_order_and_a_broken_one_is_dropped() -> None:
    stream = io.StringIO()
    writer = LineWriter(stream, flush_seconds=60)

    def line(number: int, status: int) -> str:
        return f'{{"n":{number},"status":{status}}}'

    def broken() -> str:
        raise ValueError("cannot be made")

    try:
        writer.defer(line, (1, 200))
        writer.put("plain")
        writer.defer(broken, ())
        writer.defer(line, (2, 404))
        writer.flush()
        assert stream.getvalue() == '{"n":1,"status":200}\nplain\n{"n":2,"status":404}\n'
        assert writer.format_errors == 1
    finally:
        writer.close()
