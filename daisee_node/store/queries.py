"""The read side: queries on the writer's connection, and read-only connections beside a live node.

WAL readers never block the writer, and the writer never blocks them: `status`, `prove` and the
ledger's sealing read while the node writes.
"""

from __future__ import annotations

import math
import sqlite3
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

from daisee_node.readings import Quality, Reading
from daisee_node.store.base import StoreBase
from daisee_node.store.errors import StoreError


class Reads(StoreBase):
    """Reads on the store's own connection."""

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query on the writer's connection (WAL readers never block the writer)."""
        if self._db is None and not self.read_only:
            async with self._tx_lock:  # a reconnect is under way
                pass
        if self._db is None:
            raise StoreError(f"{self.path} is not open")
        await self._migrate_registered()
        async with self._db.execute(sql, params) as cur:
            # No row factory is set: SQLite's rows are plain tuples.
            return list(cast(Iterable[tuple[Any, ...]], await cur.fetchall()))

    async def get_meta(self, key: str) -> str | None:
        """The value of a meta key, None when it is not set."""
        rows = await self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def load_latest(self) -> dict[str, Reading]:
        """The newest stored reading of every channel."""
        rows = await self.query(
            "SELECT c.name, l.t_ms, l.value, l.quality FROM latest l "
            "JOIN channels c ON c.id = l.channel_id"
        )
        return {
            name: Reading(name, t, math.nan if v is None else v, Quality(q))
            for name, t, v, q in rows
        }

    async def readings(self, channel: str, t0_ms: int, t1_ms: int) -> list[Reading]:
        """Raw readings of one channel in [t0, t1), oldest first."""
        rows = await self.query(
            "SELECT r.t_ms, r.value, r.quality FROM readings r JOIN channels c "
            "ON c.id = r.channel_id WHERE c.name = ? AND r.t_ms >= ? AND r.t_ms < ? "
            "ORDER BY r.t_ms",
            (channel, t0_ms, t1_ms),
        )
        return [Reading(channel, t, math.nan if v is None else v, Quality(q)) for t, v, q in rows]


def readonly_uri(path: Path) -> str:
    """A SQLite URI that reads `path` without writing anything beside it.

    With a -wal file present (a node is running, or stopped without a checkpoint), `mode=ro`
    reads through the node's WAL. Without one, the whole database is in the main file and
    `immutable=1` keeps SQLite from creating -wal/-shm files that a read-only connection could not
    remove again.
    """
    if not path.exists():
        raise StoreError(f"no node database at {path} (has a node run with this data dir?)")
    quoted = urllib.parse.quote(str(path.resolve()))
    if Path(f"{path}-wal").exists():
        return f"file:{quoted}?mode=ro"
    return f"file:{quoted}?mode=ro&immutable=1"


def connect_readonly(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """A synchronous read-only connection (see `readonly_uri`); a clear StoreError otherwise."""
    try:
        conn = sqlite3.connect(readonly_uri(path), uri=True, timeout=timeout)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    return conn
