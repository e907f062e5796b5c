"""VolumeCoverage: whether the index names every entry one Volume holds, so its "absent" holds.

The index is written after the Volume (a row only ever names an object that was written), so it
can lag the Volume: entries from before the index, a row whose write failed, a process that died
between its Volume write and its row. The `tts_cache_volumes` row of a Volume keeps two numbers:

- `generation`, raised whenever an entry may have reached the Volume without its row (a process
  had to drop an entry it could not record, see `proxy/index/recorder.py`);
- `covered`, the generation at which a walk of the Volume (`proxy/index/backfill.py`) that started
  at that generation reached its end, having recorded every entry it found without a row.

The index covers the Volume while `covered = generation`. A walk started before a withdrawal
cannot mark it covered (its generation is gone), so coverage is only ever claimed by a walk that
began after the last known gap.
"""

from __future__ import annotations

from proxy.config import VolumeSettings
from proxy.index.migrations import volumes_table
from proxy.index.pool import IndexPool


def volume_id(settings: VolumeSettings) -> str:
    """The name a Volume's coverage is kept under: its kind, path and prefix."""
    return f"{settings.kind}:{settings.path.rstrip('/')}/{settings.prefix.strip('/')}"


class VolumeCoverage:
    """One Volume's row in tts_cache_volumes: walks begin and complete, gaps withdraw it."""

    def __init__(self, pool: IndexPool, volume: str) -> None:
        self.pool = pool
        self.volume = volume
        self.table = volumes_table(pool.schema)

    async def begin_walk(self) -> int:
        """The generation a walk starting now will cover when it completes (creates the row)."""
        sql = (
            f"INSERT INTO {self.table} AS v (volume) VALUES ($1)"
            " ON CONFLICT (volume) DO UPDATE SET volume = v.volume RETURNING v.generation"
        )
        generation = await self.pool.run("coverage", lambda con: con.fetchval(sql, self.volume))
        return int(generation)

    async def complete_walk(self, generation: int) -> bool:
        """Mark the Volume covered by a walk begun at `generation`; False when it was withdrawn."""
        sql = (
            f"UPDATE {self.table} SET covered = $2, walked_at = now()"
            " WHERE volume = $1 AND generation = $2"
        )
        status = await self.pool.run(
            "coverage", lambda con: con.execute(sql, self.volume, generation)
        )
        return str(status).endswith(" 1")

    async def withdraw(self) -> None:
        """Say an entry may be on the Volume without its row: lookups read the Volume again."""
        sql = (
            f"INSERT INTO {self.table} AS v (volume, generation) VALUES ($1, 1)"
            " ON CONFLICT (volume) DO UPDATE SET generation = v.generation + 1"
        )
        await self.pool.run("coverage", lambda con: con.execute(sql, self.volume))

    async def covered(self) -> bool:
        """True while a complete walk covers the current generation."""
        sql = f"SELECT covered = generation FROM {self.table} WHERE volume = $1"
        answer = await self.pool.run("coverage", lambda con: con.fetchval(sql, self.volume))
        return bool(answer)
