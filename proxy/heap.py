"""How the C heap is kept from growing past what the cache holds (glibc only; a no-op elsewhere).

glibc gives each thread that allocates its own arena. Bodies read by the Volume's threads are
allocated in theirs, promoted into the memory tier, and freed on the event loop when evicted:
memory freed into a thread's arena is reused only by that thread, so the process grew ~25 MiB
past the memory tier's bound under the replay benchmark (bench/README.md). One arena for the
whole process lets every thread reuse what the others freed. The threads here do little
allocation, so the arena lock is not contended.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Final

log = logging.getLogger(__name__)

# mallopt(3) parameter number of M_ARENA_MAX in glibc's malloc.h.
M_ARENA_MAX: Final = -8


def single_arena() -> bool:
    """Ask glibc for one malloc arena; True when it took. Call before any thread starts.

    An operator's own MALLOC_ARENA_MAX (read by glibc at start) is left to rule.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        # The symbols already loaded into this process (libc's among them): no library search,
        # which on Linux would run `ldconfig -p` at every start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt): its allocator has no per-thread arenas
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    took = bool(mallopt(M_ARENA_MAX, 1))
    if not took:
        log.debug("mallopt(M_ARENA_MAX, 1) was refused")
    return took
