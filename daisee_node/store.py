"""SQLite buffer of every reading on the node.

One writer task owns every write (zigpy appdb style): sources call `put`/`put_many`, which never
block and never await; the writer commits what has arrived at most every `flush_interval_s`, in one
transaction. The database runs in WAL mode with `synchronous=FULL`, so a committed batch survives a
`kill -9` and a power cut; what can be lost is what had not been committed yet (under one second).

Retention keeps the file bounded: raw readings for `raw_days`, then 1-minute aggregates (min, max,
mean, last, count of good readings, count of bad ones) for `aggregate_days`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from daisee_node.clock import Clock
from daisee_node.errors import DaiseeError
from daisee_node.logs import get_logger
from daisee_node.readings import Channel, Quality, Reading

DB_NAME = "node.db"
MINUTE_MS = 60_000
DAY_MS = 86_400_000

# Numbered schema migrations; `PRAGMA user_version` records how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE channels (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        unit TEXT NOT NULL DEFAULT '',
        state_class TEXT NOT NULL DEFAULT 'measurement'
    );
    -- Ordered by (t_ms, channel_id): the order of the ledger's Merkle leaves and of retention.
    CREATE TABLE readings (
        t_ms INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        value REAL,
        quality INTEGER NOT NULL,
        PRIMARY KEY (t_ms, channel_id)
    ) WITHOUT ROWID;
    CREATE TABLE latest (
        channel_id INTEGER PRIMARY KEY,
        t_ms INTEGER NOT NULL,
        value REAL,
        quality INTEGER NOT NULL
    );
    CREATE TABLE readings_1m (
        minute INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        min REAL,
        max REAL,
        mean REAL,
        last REAL,
        count INTEGER NOT NULL,
        bad INTEGER NOT NULL,
        PRIMARY KEY (minute, channel_id)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL, t_ms INTEGER NOT NULL);
    """,
    """
    -- Rule decisions and relay switches, with their reasons: what the node did and why.
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        t_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        target TEXT,
        state TEXT,
        reason TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_by_time ON events (t_ms);
    """,
    """
    -- The ledger's outbox: signed commitments (own and peers') and where they landed on chain.
    CREATE TABLE commitments (
        node TEXT NOT NULL,
        seq INTEGER NOT NULL,
        own INTEGER NOT NULL,
        body TEXT NOT NULL,
        hash BLOB NOT NULL,
        signature BLOB NOT NULL,
        t0 INTEGER NOT NULL,
        t1 INTEGER NOT NULL,
        count INTEGER NOT NULL,
        sealed_ms INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        tx_hash BLOB,
        block_number INTEGER,
        block_hash BLOB,
        note TEXT,
        PRIMARY KEY (node, seq)
    );
    CREATE INDEX commitments_by_state ON commitments (state, own);
    -- Every transaction the node signed, with its nonce: the node's own nonce ledger.
    CREATE TABLE ledger_txs (
        id INTEGER PRIMARY KEY,
        nonce INTEGER NOT NULL,
        tx_hash BLOB NOT NULL UNIQUE,
        raw BLOB NOT NULL,
        items TEXT NOT NULL,
        fee INTEGER NOT NULL,
        sent_ms INTEGER NOT NULL,
        state TEXT NOT NULL
    );
    """,
)
_INSERT_EVENT = (
    "INSERT INTO events (t_ms, kind, name, target, state, reason, data) VALUES (?,?,?,?,?,?,?)"
)

_INSERT_READING = (
    "INSERT OR IGNORE INTO readings (t_ms, channel_id, value, quality) VALUES (?,?,?,?)"
)
_UPSERT_LATEST = (
    "INSERT INTO latest (channel_id, t_ms, value, quality) VALUES (?,?,?,?) "
    "ON CONFLICT(channel_id) DO UPDATE SET t_ms=excluded.t_ms, value=excluded.value, "
    "quality=excluded.quality WHERE excluded.t_ms >= latest.t_ms"
)
_ADD_COUNTER = (
    "INSERT INTO counters (name, value, t_ms) VALUES (?,?,?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value, t_ms = excluded.t_ms"
)
_SET_COUNTER = (
    "INSERT INTO counters (name, value, t_ms) VALUES (?,?,?) "
    "ON CONFLICT(name) DO UPDATE SET value = excluded.value, t_ms = excluded.t_ms"
)
# Aggregates of good readings per channel and minute; `last` is the value of the newest good one.
_ROLLUP = """
INSERT OR REPLACE INTO readings_1m (minute, channel_id, min, max, mean, last, count, bad)
SELECT a.minute, a.channel_id, a.mn, a.mx, a.mean, r.value, a.n, a.bad
FROM (
    SELECT t_ms / 60000 AS minute, channel_id,
           min(value) FILTER (WHERE quality = 0) AS mn,
           max(value) FILTER (WHERE quality = 0) AS mx,
           avg(value) FILTER (WHERE quality = 0) AS mean,
           count(*) FILTER (WHERE quality = 0) AS n,
           count(*) FILTER (WHERE quality != 0) AS bad,
           max(t_ms) FILTER (WHERE quality = 0) AS last_t
    FROM readings WHERE t_ms >= ? AND t_ms < ?
    GROUP BY minute, channel_id
) AS a
LEFT JOIN readings AS r ON r.t_ms = a.last_t AND r.channel_id = a.channel_id
"""


class StoreError(DaiseeError):
    """The node's database cannot be opened or written."""


@dataclass(slots=True)
class StoreStats:
    """What the writer has done since the daemon started."""

    written: int = 0
    duplicates: int = 0
    dropped: int = 0
    batches: int = 0
    last_batch: int = 0
    last_commit_s: float = 0.0
    rolled_up_minutes: int = 0
    deleted_raw: int = 0
    deleted_aggregates: int = 0
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long data is kept, and how often the writer commits."""

    raw_days: float = 14.0
    aggregate_days: float = 365.0
    flush_interval_s: float = 0.25
    max_pending: int = 500_000
    maintenance_interval_s: float = 60.0
    #: minutes are rolled up once they ended this long ago, so late readings still count
    rollup_grace_s: float = 5.0


def db_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / DB_NAME


class Store:
    """The reading buffer: `put` from anywhere on the event loop, `run()` as the writer task."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: Retention | None = None,
        clock: Clock | None = None,
        synchronous: str = "FULL",
    ) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self.clock = clock or Clock()
        self.synchronous = synchronous
        self.stats = StoreStats()
        self._log = get_logger("store")
        self._db: aiosqlite.Connection | None = None
        self._pending: list[Reading] = []
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._channel_ids: dict[str, int] = {}
        self._channel_info: dict[str, Channel] = {}
        self._counter_adds: dict[str, int] = {}
        self._counter_sets: dict[str, int] = {}
        self._events: list[tuple[Any, ...]] = []
        self._next_maintenance = 0.0
        self._drained = asyncio.Event()
        self._drained.set()
        self._tx_lock = asyncio.Lock()
        # Readings put and readings committed (or dropped) so far: `flush` waits on these, since
        # under a steady stream the queue itself is never empty.
        self._put_count = 0
        self._done_count = 0
        self._committed = asyncio.Event()
        #: with a ledger, raw readings are kept until their period is sealed
        self.keep_unsealed = False
        #: called after each commit with the readings just made durable
        self.on_commit: list[Callable[[Sequence[Reading]], None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating if needed), check integrity, migrate. A corrupt file is moved aside."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                await self._connect()
                ok = await self._quick_check()
            except sqlite3.DatabaseError as exc:
                ok = False
                self._log.error("database unreadable", path=str(self.path), error=str(exc))
            if not ok:
                await self._quarantine()
                await self._connect()
            await self._migrate()
            await self._load_channels()
        except BaseException:
            if self._db is not None:
                with contextlib.suppress(Exception):
                    await self._db.close()
                self._db = None
            raise
        self._next_maintenance = self.clock.now() + min(5.0, self.retention.maintenance_interval_s)

    async def _connect(self) -> None:
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA temp_store=MEMORY")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; writers take turns (they share the one connection)."""
        assert self._db is not None
        async with self._tx_lock:
            try:
                # BEGIN inside the try: a task cancelled while BEGIN is queued on the database
                # thread must still roll it back, or the connection stays inside a transaction
                # and every later BEGIN fails.
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._db.execute("ROLLBACK")
                raise

    async def _quick_check(self) -> bool:
        assert self._db is not None
        async with self._db.execute("PRAGMA quick_check") as cur:
            rows = [r[0] for r in await cur.fetchall()]
        if rows == ["ok"]:
            return True
        self._log.error("database failed its integrity check", path=str(self.path), found=rows[:5])
        return False

    async def _quarantine(self) -> None:
        """Keep the damaged file for inspection and start a new one: the node must go on."""
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        await asyncio.to_thread(_move_aside, self.path, f".corrupt-{stamp}")
        self._log.error(
            "corrupt database moved aside; starting a new one",
            kept_as=f"{self.path}.corrupt-{stamp}",
        )

    async def _migrate(self) -> None:
        assert self._db is not None
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this daisee-node "
                f"understands ({len(MIGRATIONS)}); upgrade daisee-node"
            )
        for number in range(version, len(MIGRATIONS)):
            async with self.transaction() as db:
                for statement in _split_sql(MIGRATIONS[number]):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version={number + 1}")
            self._log.info("schema migrated", version=number + 1)

    async def _load_channels(self) -> None:
        assert self._db is not None
        async with self._db.execute("SELECT id, name FROM channels") as cur:
            self._channel_ids = {name: cid for cid, name in await cur.fetchall()}

    async def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        if self._db is None:
            return
        try:
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the producer side -----------------------------------------------------------------

    def declare(self, channels: Iterable[Channel]) -> None:
        """Tell the store the unit and class of channels before their first reading."""
        for ch in channels:
            self._channel_info[ch.name] = ch

    def put(self, reading: Reading) -> None:
        self._pending.append(reading)
        self._put_count += 1
        self._after_put()

    def put_many(self, readings: Sequence[Reading]) -> None:
        self._pending.extend(readings)
        self._put_count += len(readings)
        self._after_put()

    def _after_put(self) -> None:
        excess = len(self._pending) - self.retention.max_pending
        if excess > 0:
            # The disk is not keeping up (or is failing): keep the newest, count the loss.
            del self._pending[:excess]
            self._done_count += excess  # dropped: nothing to wait for
            if self.stats.dropped == 0:
                self._log.error(
                    "store backlog full; dropping oldest readings",
                    max_pending=self.retention.max_pending,
                )
            self.stats.dropped += excess
        if not self._wakeup.is_set():
            self._wakeup.set()
        self._drained.clear()

    def put_event(
        self,
        t_ms: int,
        kind: str,
        name: str,
        target: str | None,
        state: str | None,
        reason: str,
        data: str | None = None,
    ) -> None:
        """Record a decision or a switch (written with the next batch)."""
        self._events.append((t_ms, kind, name, target, state, reason, data))
        if not self._wakeup.is_set():
            self._wakeup.set()

    def add_counter(self, name: str, delta: int) -> None:
        """Add to a persistent counter (written with the next batch)."""
        self._counter_adds[name] = self._counter_adds.get(name, 0) + delta

    def set_counter(self, name: str, value: int) -> None:
        self._counter_sets[name] = value

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the writer task -------------------------------------------------------------------

    async def run(self) -> None:
        """The writer task. Returns after `stop()`, once everything pending is committed."""
        if self._db is None:
            await self.open()
        last_commit = 0.0
        while True:
            if not (self._pending or self._events) and not self._stopping:
                self._drained.set()
                self._wakeup.clear()
                timeout = max(0.05, (self._next_maintenance - self.clock.now()) / self.clock.speed)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=min(timeout, 5.0))
            if self._stopping and not self._pending:
                await self._write_batch([])  # counters
                self._drained.set()
                return
            since = time.monotonic() - last_commit
            if not self._stopping and since < self.retention.flush_interval_s:
                await asyncio.sleep(self.retention.flush_interval_s - since)
            if self._pending or self._counter_adds or self._counter_sets or self._events:
                batch, self._pending = self._pending, []
                last_commit = time.monotonic()
                await self._write_batch(batch)
            if self.clock.now() >= self._next_maintenance and not self._stopping:
                await self.maintain()

    def stop(self) -> None:
        """Ask the writer to commit what is pending and return."""
        self._stopping = True
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until everything put so far is committed (the writer must be running)."""
        target = self._put_count
        while self._done_count < target:
            self._committed.clear()
            self._wakeup.set()
            await self._committed.wait()

    async def _write_batch(self, batch: list[Reading]) -> None:
        assert self._db is not None
        # Taken before the first await: what arrives while this batch commits goes in the next.
        adds, self._counter_adds = self._counter_adds, {}
        sets, self._counter_sets = self._counter_sets, {}
        events, self._events = self._events, []
        try:
            try:
                ids = self._channel_ids
                rows = [(r.t_ms, ids[r.channel], r.value, r.quality) for r in batch]
            except KeyError:
                await self._register_channels({r.channel for r in batch})
                ids = self._channel_ids
                rows = [(r.t_ms, ids[r.channel], r.value, r.quality) for r in batch]
            latest = {row[1]: row for row in rows}
            now_ms = self.clock.now_ms()
            t0 = time.perf_counter()
            async with self.transaction() as db:
                inserted = 0
                if rows:
                    cur = await db.executemany(_INSERT_READING, rows)
                    inserted = cur.rowcount
                    await db.executemany(
                        _UPSERT_LATEST, [(c, t, v, q) for (t, c, v, q) in latest.values()]
                    )
                counted = dict(adds)
                if inserted:
                    counted["readings_stored"] = counted.get("readings_stored", 0) + inserted
                if counted:
                    await db.executemany(_ADD_COUNTER, [(k, v, now_ms) for k, v in counted.items()])
                if sets:
                    await db.executemany(_SET_COUNTER, [(k, v, now_ms) for k, v in sets.items()])
                if events:
                    await db.executemany(_INSERT_EVENT, events)
        except BaseException:
            # Nothing is lost: the batch and the counters go back in front of what came since.
            self._pending[:0] = batch
            for k, v in adds.items():
                self._counter_adds[k] = self._counter_adds.get(k, 0) + v
            for k, v in sets.items():
                self._counter_sets.setdefault(k, v)
            self._events[:0] = events
            raise
        self._done_count += len(batch)
        self._committed.set()
        s = self.stats
        s.written += inserted
        s.duplicates += len(rows) - inserted
        s.batches += 1 if rows else 0
        s.last_batch = len(rows)
        s.last_commit_s = time.perf_counter() - t0
        if batch:
            for callback in self.on_commit:
                callback(batch)

    async def _register_channels(self, names: set[str]) -> None:
        assert self._db is not None
        new = sorted(n for n in names if n not in self._channel_ids)
        for name in new:
            info = self._channel_info.get(name)
            unit = info.unit if info else ""
            state_class = info.state_class if info else "measurement"
            await self._db.execute(
                "INSERT OR IGNORE INTO channels (name, unit, state_class) VALUES (?,?,?)",
                (name, unit, state_class),
            )
        await self._load_channels()

    # -- maintenance: rollup and retention ---------------------------------------------------

    async def maintain(self, now_ms: int | None = None) -> None:
        """Roll complete minutes up into aggregates, then drop what is past retention."""
        now_ms = self.clock.now_ms() if now_ms is None else now_ms
        self._next_maintenance = self.clock.now() + self.retention.maintenance_interval_s
        await self._rollup(now_ms)
        await self._expire(now_ms)

    async def get_meta(self, key: str) -> str | None:
        rows = await self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        async with self.transaction() as db:
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def _meta_int(self, key: str) -> int | None:
        assert self._db is not None
        async with self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None

    async def _rollup(self, now_ms: int) -> None:
        assert self._db is not None
        until = (now_ms - int(self.retention.rollup_grace_s * 1000)) // MINUTE_MS * MINUTE_MS
        start = await self._meta_int("rollup_until_ms")
        if start is None:
            async with self._db.execute("SELECT min(t_ms) FROM readings") as cur:
                row = await cur.fetchone()
            if row is None or row[0] is None:
                return
            start = int(row[0]) // MINUTE_MS * MINUTE_MS
        step = 60 * MINUTE_MS  # an hour per transaction keeps each write short
        while start < until:
            end = min(until, start + step)
            async with self.transaction() as db:
                cur = await db.execute(_ROLLUP, (start, end))
                await db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('rollup_until_ms', ?)",
                    (str(end),),
                )
            self.stats.rolled_up_minutes += max(0, cur.rowcount)
            start = end
            await asyncio.sleep(0)  # let the loop breathe between chunks

    async def _expire(self, now_ms: int) -> None:
        assert self._db is not None
        rolled = await self._meta_int("rollup_until_ms")
        raw_cutoff = now_ms - int(self.retention.raw_days * DAY_MS)
        # Raw readings are deleted only once they are summarised in the aggregates.
        if self.keep_unsealed:
            # Readings of a period not yet sealed into a commitment are the ledger's to keep.
            sealed = await self._meta_int("ledger_sealed_until_ms")
            raw_cutoff = min(raw_cutoff, sealed or 0)
        if rolled is not None:
            raw_cutoff = min(raw_cutoff, rolled)
            self.stats.deleted_raw += await self._delete_chunked(
                "DELETE FROM readings WHERE t_ms < ?",
                "SELECT min(t_ms) FROM readings",
                raw_cutoff,
                3_600_000,
                counter="readings_stored",
            )
        agg_cutoff = (now_ms - int(self.retention.aggregate_days * DAY_MS)) // MINUTE_MS
        self.stats.deleted_aggregates += await self._delete_chunked(
            "DELETE FROM readings_1m WHERE minute < ?",
            "SELECT min(minute) FROM readings_1m",
            agg_cutoff,
            24 * 60,
        )

    async def _delete_chunked(
        self, delete_sql: str, min_sql: str, cutoff: int, step: int, counter: str | None = None
    ) -> int:
        """Delete below `cutoff` in `step`-wide slices, one short transaction each."""
        assert self._db is not None
        async with self._db.execute(min_sql) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return 0
        total = 0
        lower = int(row[0])
        while lower < cutoff:
            lower = min(cutoff, lower + step)
            async with self.transaction() as db:
                cur = await db.execute(delete_sql, (lower,))
                if counter and cur.rowcount > 0:
                    await db.execute(_ADD_COUNTER, (counter, -cur.rowcount, now_ms()))
            total += max(0, cur.rowcount)
            await asyncio.sleep(0)
        return total

    # -- reads -------------------------------------------------------------------------------

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query on the writer's connection (WAL readers never block the writer)."""
        assert self._db is not None
        async with self._db.execute(sql, params) as cur:
            return list(await cur.fetchall())

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


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (none of ours contain `;` inside a literal)."""
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _move_aside(path: Path, tag: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{path}{tag}{suffix}")
