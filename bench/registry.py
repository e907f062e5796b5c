"""Every scenario `python -m bench.run` knows, in the order a whole run takes them."""

from __future__ import annotations

from typing import Final

from bench.burst import burst_of_misses
from bench.footprint import FOOTPRINT, footprint
from bench.production import PRODUCTION, production_replay
from bench.replay import REPLAY, replay
from bench.scenarios import (
    BURST,
    MEMORY_HIT,
    MISS,
    VOLUME_HIT,
    Runner,
    memory_hit,
    miss,
    volume_hit,
)

RUNNERS: Final[dict[str, Runner]] = {
    MEMORY_HIT: memory_hit,
    VOLUME_HIT: volume_hit,
    MISS: miss,
    BURST: burst_of_misses,
    REPLAY: replay,
    PRODUCTION: production_replay,
    FOOTPRINT: footprint,
}
SCENARIOS: Final = tuple(RUNNERS)
