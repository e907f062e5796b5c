"""Request ids: unique per request, and per process after `serve --workers` forks."""

from __future__ import annotations

import os

from proxy.request_context import new_request_id


def test_ids_differ_request_by_request() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000


def test_a_forked_worker_gets_a_prefix_of_its_own() -> None:
    parent = new_request_id().split("-")[0]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the worker
        os.write(writer, new_request_id().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    theirs = os.read(reader, 100).decode()
    os.close(reader)
    assert theirs.split("-")[0] != parent
