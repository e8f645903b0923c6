"""SQLite buffer of every reading on the node.

One writer task owns every write (zigpy appdb style): sources call `put`/`put_many`, which never
block and never await; the writer commits what has arrived at most every `flush_interval_s`, in one
transaction. The database runs in WAL mode with `synchronous=FULL`, so a committed batch survives a
`kill -9` and a power cut; what can be lost is what had not been committed yet (under one second).

Retention keeps the file bounded: raw readings for `raw_days`, then 1-minute aggregates (min, max,
mean, last, count of good readings, count of bad ones) for `aggregate_days`; events for
`events_days`. Maintenance (rollup, retention) works in short slices within a time budget per turn,
so a long backlog never holds the writer for long.

Costs at start stay flat in the size of the file: `open` checks only what a crash can have touched
(the schema and the newest pages of each table; in WAL mode with `synchronous=FULL` a killed process
cannot leave the rest damaged). The full `PRAGMA integrity_check` runs on a connection of its own
in a thread, after start and then daily; a failure is logged, counted and marks the file, which is
moved aside at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import math
import os
import sqlite3
import stat
import time
import urllib.parse
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
#: the writer's health, for `status`: a fixed-size file rewritten in place, so it can still be
#: updated when the disk is full
HEALTH_NAME = "store-health.json"
HEALTH_BYTES = 16_384
#: beside the database: the background integrity check found damage; moved aside at next start
INTEGRITY_MARK = ".integrity-failed"
#: meta keys holding the newest event of each (kind, name, target), so `status` never scans events
LAST_EVENT_PREFIX = "last_event|"
LAST_EVENT_END = "last_event}"  # '}' sorts right after '|': the end of the prefix's key range
_LAST_EVENTS_KEPT = "last_events_kept"
#: rows read from the newest end of each table at start
_START_CHECK_ROWS = 256
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
_SET_LAST_EVENT = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
# The newest row of each group: SQLite takes bare columns from the max(id) row.
LAST_EVENTS_SCAN = (
    "SELECT kind, name, target, state, reason, t_ms, max(id) FROM events "
    "GROUP BY kind, name, target"
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
    #: failed write transactions (disk full, I/O error, locked by another process)
    write_errors: int = 0
    #: the newest write error, "" once a write succeeds again
    last_error: str = ""
    #: events (rule decisions, switches) dropped because the backlog was full
    dropped_events: int = 0
    deleted_events: int = 0
    #: background integrity checks that found the file damaged
    integrity_failures: int = 0
    integrity_checks: int = 0
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
    #: longest wait between two tries of a failing write
    retry_max_s: float = 5.0
    #: events (decisions, switches) held in memory at most while writes fail
    max_pending_events: int = 10_000
    #: days events are kept; None: as long as raw readings
    events_days: float | None = None
    #: most time one maintenance turn holds the writer; the rest waits for the next turn
    maintenance_budget_s: float = 0.25
    #: the full integrity check runs this long after the writer starts, then every interval
    integrity_delay_s: float = 120.0
    integrity_interval_s: float = 86_400.0


def db_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / DB_NAME


class Store:
    """The reading buffer: `put` from anywhere on the event loop, `run()` as the writer task.

    `read_only=True` is for commands that only look (status, prove, verify) beside a live node:
    the file is opened with SQLite's `mode=ro`, never created, migrated, tightened or moved.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: Retention | None = None,
        clock: Clock | None = None,
        synchronous: str = "FULL",
        read_only: bool = False,
        lock_timeout_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.lock_timeout_s = lock_timeout_s
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
        self.health_path = self.path.with_name(HEALTH_NAME)
        self._failing_since_ms: int | None = None
        self._health_written = 0.0
        # Opened without shared memory (a full disk cannot hold the -shm file): other programs
        # cannot read until the writer reconnects normally.
        self._exclusive = False
        self.integrity_mark = Path(f"{self.path}{INTEGRITY_MARK}")
        self._check_task: asyncio.Task[bool | None] | None = None
        self._check_cancelled = False
        self._next_check = math.inf
        self._counters_ready = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (creating if needed), check what a crash can damage, migrate.

        Only a file SQLite reports as damaged (not a database, malformed, failing the start check,
        or marked by a failed background integrity check) is moved aside. A database locked by
        another process is waited for, up to `lock_timeout_s`, then reported as a `StoreError`
        with nothing moved. Read-only: the file must exist, and nothing is created, migrated,
        tightened or moved.
        """
        if self.read_only:
            await self._open_read_only()
            return
        if self.integrity_mark.exists():
            self._log.error(
                "the last integrity check found the database damaged",
                path=str(self.path),
                found=_read_mark(self.integrity_mark),
            )
            await self._quarantine()
        try:
            await asyncio.to_thread(self._prepare_files)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            exclusive = False
            while True:
                try:
                    await self._connect(exclusive=exclusive)
                    ok = await self._start_check()
                    break
                except sqlite3.DatabaseError as exc:
                    await self._close_quietly()
                    kind = classify_error(exc)
                    if kind in ("full", "io") and not exclusive and self.path.stat().st_size:
                        # SQLite could not create its shared-memory file: most likely a full
                        # disk. Without it the file can still be read, and written once space
                        # returns.
                        self._log.warning(
                            "cannot create the database's shared-memory file (disk full?); "
                            "opening it for this process only",
                            path=str(self.path),
                            error=str(exc),
                        )
                        exclusive = True
                        continue
                    if kind == "locked":
                        if time.monotonic() < deadline:
                            await asyncio.sleep(0.2)
                            continue
                        raise StoreError(
                            f"{self.path} is locked by another process (waited "
                            f"{self.lock_timeout_s:g} s): {exc}; is another program using it?"
                        ) from None
                    if kind != "corrupt":
                        raise StoreError(f"cannot open {self.path}: {exc}") from None
                    ok = False
                    self._log.error("database unreadable", path=str(self.path), error=str(exc))
                    break
            if not ok:
                await self._quarantine()
                await self._connect()
            try:
                await self._migrate()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot prepare {self.path}: {exc}") from None
            await self._load_channels()
        except BaseException:
            await self._close_quietly()
            raise
        self._next_maintenance = self.clock.now() + min(5.0, self.retention.maintenance_interval_s)

    async def _open_read_only(self) -> None:
        try:
            self._db = await aiosqlite.connect(
                readonly_uri(self.path), uri=True, isolation_level=None
            )
            await self._db.execute(f"PRAGMA busy_timeout={int(self.lock_timeout_s * 1000)}")
            async with self._db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(_too_new(self.path, version))
            if version >= 1:
                await self._load_channels()
        except sqlite3.Error as exc:
            await self._close_quietly()
            raise StoreError(f"cannot read {self.path}: {exc}") from None
        except BaseException:
            await self._close_quietly()
            raise

    def _prepare_files(self) -> None:
        """The db's folder (0700) and the db itself (0600) before SQLite sees them.

        SQLite gives the -wal and -shm files the mode of the database file, so creating the file
        private here keeps all three private.
        """
        ensure_private_dir(self.path.parent)
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        for suffix in ("", "-wal", "-shm"):
            _tighten(Path(f"{self.path}{suffix}"), 0o600, self._log)
        _tighten(self.health_path, 0o600, self._log)
        try:
            self._write_health(force=True)
        except OSError as exc:
            self._log.warning("cannot write the store's health file", error=str(exc))

    async def _close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None
            _release_statements()

    async def _connect(self, exclusive: bool = False) -> None:
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        # The busy timeout first: switching to WAL must also wait for another process's lock.
        busy_ms = int(min(5.0, self.lock_timeout_s) * 1000)
        await self._db.execute(f"PRAGMA busy_timeout={busy_ms}")
        if exclusive:
            # Set before the first access in WAL mode, SQLite keeps the WAL index in memory.
            await self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        async with self._db.execute("PRAGMA journal_mode=WAL") as cur:
            await cur.fetchall()
        await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
        await self._db.execute("PRAGMA temp_store=MEMORY")
        self._exclusive = exclusive

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; writers take turns (they share the one connection)."""
        assert self._db is not None
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        async with self._tx_lock:
            try:
                # BEGIN inside the try: a task cancelled while BEGIN is queued on the database
                # thread must still roll it back, or the connection stays inside a transaction
                # and every later BEGIN fails.
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await self._db.execute("ROLLBACK")
                if _is_write_failure(exc):
                    self._write_failed(exc)
                raise
            if self._failing_since_ms is not None:
                await self._write_recovered()

    async def _start_check(self) -> bool:
        """Read what a crash can have touched: the schema and the newest rows of every table.

        Cost is flat in the size of the file. With WAL and `synchronous=FULL` a killed process
        leaves committed pages intact and the rest in the WAL; a damaged page raises a
        `DatabaseError` here (classified by the caller). Damage elsewhere (a failing SD card) is
        the background check's to find.
        """
        assert self._db is not None
        async with self._db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL"
        ) as cur:
            tables = list(await cur.fetchall())
        for name, sql in tables:
            if name.startswith("sqlite_"):
                continue
            async with self._db.execute(f'PRAGMA table_info("{name}")') as cur:
                info = list(await cur.fetchall())
            if "WITHOUT ROWID" in str(sql).upper():
                keys = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5]]
                order = ", ".join(f'"{k}" DESC' for k in keys)
            else:
                order = "rowid DESC"
            async with self._db.execute(
                f'SELECT * FROM "{name}" ORDER BY {order} LIMIT {_START_CHECK_ROWS}'
            ) as cur:
                await cur.fetchall()
        return True

    async def check_integrity(self) -> bool | None:
        """The full `PRAGMA integrity_check`, on a read-only connection in a thread.

        The writer goes on meanwhile (a WAL reader never blocks it). True: the file is sound;
        False: damage found, logged, counted and marked so the next start moves the file aside;
        None: the check could not run (stopped, or the file is not shared).
        """
        started = time.monotonic()
        findings = await asyncio.to_thread(self._integrity_findings)
        if findings is None:
            return None
        self.stats.integrity_checks += 1
        took = round(time.monotonic() - started, 3)
        if findings == ["ok"]:
            self._log.info("database integrity check passed", path=str(self.path), took_s=took)
            self.set_counter("store.integrity_ok_ms", now_ms())
            return True
        self.stats.integrity_failures += 1
        self.add_counter("store.integrity_failures", 1)
        self._log.error(
            "database failed its integrity check; it is moved aside at the next start",
            path=str(self.path),
            found=findings[:5],
            took_s=took,
        )
        try:
            await asyncio.to_thread(_write_mark, self.integrity_mark, findings)
        except OSError as exc:
            self._log.error("cannot mark the damaged database", error=str(exc))
        return False

    def _integrity_findings(self) -> list[str] | None:
        """Run the check (in a worker thread); None when it could not run to the end."""
        try:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro",
                uri=True,
                timeout=5.0,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            self._log.warning("integrity check could not open the database", error=str(exc))
            return None
        try:
            # Polled by SQLite while the check runs: a stopping writer ends it at once.
            conn.set_progress_handler(lambda: 1 if self._check_cancelled else 0, 10_000)
            rows = conn.execute("PRAGMA integrity_check(100)").fetchall()
            return [str(r[0]) for r in rows]
        except sqlite3.Error as exc:
            if self._check_cancelled:
                return None
            if classify_error(exc) == "corrupt":
                return [str(exc)]
            self._log.warning("integrity check could not run", error=str(exc))
            return None
        finally:
            conn.close()

    def _start_scheduled_check(self) -> None:
        now = time.monotonic()
        if self._check_task is not None or now < self._next_check or self._exclusive:
            return
        self._next_check = now + self.retention.integrity_interval_s

        async def scheduled() -> bool | None:
            try:
                return await self.check_integrity()
            finally:
                self._check_task = None

        self._check_task = asyncio.create_task(scheduled(), name="store.integrity")

    async def _stop_check(self) -> None:
        """End a running background check (SQLite polls the flag) and wait for its thread."""
        task = self._check_task
        if task is None:
            return
        self._check_cancelled = True
        try:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        finally:
            self._check_task = None
            self._check_cancelled = False

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
            raise StoreError(_too_new(self.path, version))
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
        await self._stop_check()
        if self._db is None:
            return
        if self.read_only:
            await self._close_quietly()
            return
        try:
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            # The committed data is safe in the WAL; the next open checkpoints it.
            self._log.warning("checkpoint at close failed", error=str(exc))
        finally:
            await self._db.close()
            self._db = None
            _release_statements()
            with contextlib.suppress(OSError):
                self._write_health(force=True, closed=True)

    # -- health ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while writes fail (since the last failed write, until one succeeds)."""
        return self._failing_since_ms is None

    @property
    def write_errors(self) -> int:
        """Failed write transactions since the store was created."""
        return self.stats.write_errors

    @property
    def last_error(self) -> str | None:
        """The newest write error while writes fail; None when healthy."""
        return self.stats.last_error or None

    def status_line(self) -> str:
        """One line for systemd's STATUS= and logs: ok, or failing with the error."""
        if self.healthy and not self.stats.write_errors:
            return "store ok"
        if self.healthy:
            return f"store ok ({self.stats.write_errors} write errors, recovered)"
        return (
            f"store writes failing ({self.stats.write_errors} errors, {self.pending} readings "
            f"held, {self.stats.dropped} dropped): {self.stats.last_error}"
        )

    def health(self, closed: bool = False) -> dict[str, Any]:
        """The writer's health as plain data (what the health file holds)."""
        return {
            "pid": None if closed else os.getpid(),
            "t_ms": now_ms(),
            "healthy": self.healthy,
            "write_errors": self.stats.write_errors,
            "last_error": self.last_error,
            "failing_since_ms": self._failing_since_ms,
            "pending": self.pending,
            "dropped": self.stats.dropped,
            "dropped_events": self.stats.dropped_events,
        }

    def _unwritten_state(self) -> dict[str, Any]:
        """Relay and rule state held in memory, not yet in the database."""
        counters = {
            k: v for k, v in self._counter_sets.items() if k.startswith(("relay.", "rule."))
        }
        events: dict[str, list[Any]] = {}
        for t_ms, kind, name, target, state, reason, _ in self._events:
            events[f"{kind}|{name}|{target or ''}"] = [state, reason, t_ms]
        return {"counters": counters, "events": events}

    def _write_health(self, force: bool = False, closed: bool = False) -> None:
        """Rewrite the health file in place (no new disk blocks needed once it exists)."""
        if not force and time.monotonic() - self._health_written < 2.0:
            return
        self._health_written = time.monotonic()
        report = self.health(closed)
        if not self.healthy:
            report["unwritten"] = self._unwritten_state()
        data = json.dumps(report, separators=(",", ":")).encode()
        if len(data) > HEALTH_BYTES:
            report.pop("unwritten", None)
            data = json.dumps(report, separators=(",", ":")).encode()
        fd = os.open(self.health_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # Trailing spaces are valid JSON whitespace: the file keeps its full size.
            os.pwrite(fd, data.ljust(HEALTH_BYTES), 0)
        finally:
            os.close(fd)

    def _write_failed(self, exc: BaseException) -> None:
        self.stats.write_errors += 1
        self.stats.last_error = f"{classify_error(exc)}: {exc}"
        self.add_counter("store.write_errors", 1)
        if self._failing_since_ms is None:
            self._failing_since_ms = now_ms()
            self._health_written = 0.0  # the first failure is published at once
            self._log.error(
                "store writes failing; readings are held in memory and retried",
                error=str(exc),
                max_pending=self.retention.max_pending,
            )
        else:
            self._log.debug("store write failed again", error=str(exc))

    async def _write_recovered(self) -> None:
        assert self._failing_since_ms is not None
        self._log.warning(
            "store writes recovered",
            failed_for_s=round((now_ms() - self._failing_since_ms) / 1000, 1),
            write_errors=self.stats.write_errors,
            dropped=self.stats.dropped,
        )
        self._failing_since_ms = None
        self.stats.last_error = ""
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._write_health, True)

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
            self.add_counter("store.dropped", excess)
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
        excess = len(self._events) - self.retention.max_pending_events
        if excess > 0:
            del self._events[:excess]
            if self.stats.dropped_events == 0:
                self._log.error(
                    "store backlog full; dropping oldest events",
                    max_pending_events=self.retention.max_pending_events,
                )
            self.stats.dropped_events += excess
            self.add_counter("store.dropped_events", excess)
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
        """The writer task. Returns after `stop()`, once everything pending is committed.

        A failing write (disk full, I/O error, a lock held elsewhere) does not end the task: the
        batch stays in memory (bounded by `max_pending`, oldest dropped first), the error is
        counted, and the write is tried again after a growing pause, until it succeeds.
        """
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only; it has no writer")
        if self._db is None:
            await self.open()
        self._next_check = time.monotonic() + self.retention.integrity_delay_s
        try:
            await self._run()
        finally:
            await self._stop_check()

    async def _run(self) -> None:
        last_commit = 0.0
        retry_s = 0.0
        while True:
            if not self._stopping:
                self._start_scheduled_check()
            if not (self._pending or self._events) and not self._stopping:
                self._drained.set()
                self._wakeup.clear()
                due = self._next_maintenance - self.clock.now()
                # An unfinished maintenance turn (a backlog) goes on at once.
                timeout = 0.0 if due <= 0 else max(0.05, due / self.clock.speed)
                if retry_s:
                    timeout = min(timeout, retry_s)
                if self._check_task is None:
                    timeout = min(timeout, max(0.05, self._next_check - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=min(timeout, 5.0))
            if self._stopping and not self._pending:
                with contextlib.suppress(*_WRITE_FAILURES):
                    await self._write_batch([])  # counters
                self._drained.set()
                return
            since = time.monotonic() - last_commit
            wait = max(self.retention.flush_interval_s, retry_s)
            if not self._stopping and since < wait:
                await asyncio.sleep(wait - since)
            try:
                if self._db is None:  # a reconnect failed: try again
                    async with self._tx_lock:
                        await self._connect(exclusive=True)
                if self._pending or self._counter_adds or self._counter_sets or self._events:
                    batch, self._pending = self._pending, []
                    last_commit = time.monotonic()
                    await self._write_batch(batch)
                    if self._exclusive:
                        await self._reconnect_shared()
                if self.clock.now() >= self._next_maintenance and not self._stopping:
                    await self.maintain(budget_s=self.retention.maintenance_budget_s)
            except _WRITE_FAILURES as exc:
                if not _is_write_failure(exc):
                    raise
                if self._stopping:
                    self._log.error(
                        "store stopped with readings not written",
                        lost=self.pending,
                        error=str(exc),
                    )
                    self._done_count += self.pending
                    self._committed.set()
                    self._drained.set()
                    return
                # Published here, once the failed batch is back in memory (at most every 2 s).
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._write_health)
                last_commit = time.monotonic()
                retry_s = min(self.retention.retry_max_s, max(0.25, retry_s * 2))
                # The rest of maintenance waits for the next turn.
                self._next_maintenance = self.clock.now() + self.retention.maintenance_interval_s
                continue
            retry_s = 0.0

    async def _reconnect_shared(self) -> None:
        """Leave exclusive mode once writes work again, so other programs can read."""
        async with self._tx_lock:  # no transaction may start on the connection being replaced
            await self._close_quietly()
            try:
                await self._connect()
            except sqlite3.Error as exc:
                await self._close_quietly()
                self._log.warning("still cannot share the database", error=str(exc))
                await self._connect(exclusive=True)
            else:
                self._log.info("database shared again", path=str(self.path))

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
                async with self.transaction():
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
                    await db.executemany(_SET_LAST_EVENT, _last_events(events))
        except BaseException:
            # Nothing is lost: the batch and the counters go back in front of what came since
            # (within the backlog's bound: the oldest readings are dropped first, counted).
            self._pending[:0] = batch
            self._after_put()
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

    async def maintain(self, now_ms: int | None = None, budget_s: float | None = None) -> bool:
        """Roll complete minutes up into aggregates, then drop what is past retention.

        With `budget_s`, stops after the slice that crosses the budget and returns False: the
        writer commits what arrived meanwhile and comes back at once. Without, runs to the end.
        """
        now_ms = self.clock.now_ms() if now_ms is None else now_ms
        deadline = math.inf if budget_s is None else time.monotonic() + budget_s
        await self._prepare_counters()
        done = await self._rollup(now_ms, deadline) and await self._expire(now_ms, deadline)
        self._next_maintenance = self.clock.now() + (
            self.retention.maintenance_interval_s if done else 0.0
        )
        return done

    async def _prepare_counters(self) -> None:
        """Once per file: count aggregates and note each key's last event, for `status`.

        Files written before these were kept are counted once here (a scan, after READY); from
        then on they are kept up to date with every write.
        """
        if self._counters_ready:
            return
        assert self._db is not None
        async with self._db.execute(
            "SELECT 1 FROM counters WHERE name = 'aggregates_stored'"
        ) as cur:
            counted = await cur.fetchone() is not None
        kept = await self._meta_int(_LAST_EVENTS_KEPT) is not None
        if not (counted and kept):
            async with self.transaction() as db:
                if not counted:
                    await db.execute(
                        "INSERT OR REPLACE INTO counters (name, value, t_ms) "
                        "SELECT 'aggregates_stored', count(*), ? FROM readings_1m",
                        (now_ms(),),
                    )
                if not kept:
                    async with db.execute(LAST_EVENTS_SCAN) as cur:
                        rows = [tuple(r[:6]) for r in await cur.fetchall()]
                    await db.executemany(
                        _SET_LAST_EVENT,
                        _last_events([(t, k, n, g, st, why, None) for k, n, g, st, why, t in rows]),
                    )
                    await db.execute(_SET_LAST_EVENT, (_LAST_EVENTS_KEPT, "1"))
        self._counters_ready = True

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

    async def _rollup(self, now_ms: int, deadline: float = math.inf) -> bool:
        """Roll up from where the last run stopped, in short slices; False if out of time."""
        assert self._db is not None
        until = (now_ms - int(self.retention.rollup_grace_s * 1000)) // MINUTE_MS * MINUTE_MS
        start = await self._meta_int("rollup_until_ms")
        if start is None:
            async with self._db.execute("SELECT min(t_ms) FROM readings") as cur:
                row = await cur.fetchone()
            if row is None or row[0] is None:
                return True
            start = int(row[0]) // MINUTE_MS * MINUTE_MS
        step = 10 * MINUTE_MS  # a slice is one short transaction, even at high sample rates
        while start < until:
            # Skips a gap (the node was stopped) in one primary-key search.
            async with self._db.execute(
                "SELECT min(t_ms) FROM readings WHERE t_ms >= ? AND t_ms < ?", (start, until)
            ) as cur:
                row = await cur.fetchone()
            first = None if row is None or row[0] is None else int(row[0])
            async with self.transaction() as db:
                if first is None:
                    end = until
                else:
                    start = max(start, first // MINUTE_MS * MINUTE_MS)
                    end = min(until, start + step)
                    span = (start // MINUTE_MS, end // MINUTE_MS)
                    async with db.execute(
                        "SELECT count(*) FROM readings_1m WHERE minute >= ? AND minute < ?", span
                    ) as cur:
                        had = int((await cur.fetchone() or (0,))[0])
                    cur = await db.execute(_ROLLUP, (start, end))
                    made = max(0, cur.rowcount)
                    self.stats.rolled_up_minutes += made
                    if made != had:
                        stamp = time.time_ns() // 1_000_000
                        await db.execute(_ADD_COUNTER, ("aggregates_stored", made - had, stamp))
                await db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('rollup_until_ms', ?)",
                    (str(end),),
                )
            start = end
            await asyncio.sleep(0)  # let the loop breathe between slices
            if start < until and time.monotonic() >= deadline:
                return False  # at least one slice per turn: a backlog always shrinks
        return True

    async def _expire(self, now_ms: int, deadline: float = math.inf) -> bool:
        """Delete what is past retention, in slices; False if out of time."""
        assert self._db is not None
        rolled = await self._meta_int("rollup_until_ms")
        raw_cutoff = now_ms - int(self.retention.raw_days * DAY_MS)
        # Raw readings are deleted only once they are summarised in the aggregates.
        if self.keep_unsealed:
            # Readings of a period not yet sealed into a commitment are the ledger's to keep.
            sealed = await self._meta_int("ledger_sealed_until_ms")
            raw_cutoff = min(raw_cutoff, sealed or 0)
        done = True
        if rolled is not None:
            raw_cutoff = min(raw_cutoff, rolled)
            deleted, done = await self._delete_chunked(
                "DELETE FROM readings WHERE t_ms < ?",
                "SELECT min(t_ms) FROM readings",
                raw_cutoff,
                3_600_000,
                deadline,
                counter="readings_stored",
            )
            self.stats.deleted_raw += deleted
        if not done:
            return False
        agg_cutoff = (now_ms - int(self.retention.aggregate_days * DAY_MS)) // MINUTE_MS
        deleted, done = await self._delete_chunked(
            "DELETE FROM readings_1m WHERE minute < ?",
            "SELECT min(minute) FROM readings_1m",
            agg_cutoff,
            24 * 60,
            deadline,
            counter="aggregates_stored",
        )
        self.stats.deleted_aggregates += deleted
        if not done:
            return False
        events_days = self.retention.events_days
        events_cutoff = now_ms - int((events_days or self.retention.raw_days) * DAY_MS)
        deleted, done = await self._delete_chunked(
            "DELETE FROM events WHERE t_ms < ?",
            "SELECT min(t_ms) FROM events",
            events_cutoff,
            DAY_MS,
            deadline,
        )
        self.stats.deleted_events += deleted
        return done

    async def _delete_chunked(
        self,
        delete_sql: str,
        min_sql: str,
        cutoff: int,
        step: int,
        deadline: float = math.inf,
        counter: str | None = None,
    ) -> tuple[int, bool]:
        """Delete below `cutoff` in `step`-wide slices, one short transaction each.

        Returns how many rows went, and False if the deadline came first.
        """
        assert self._db is not None
        async with self._db.execute(min_sql) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return 0, True
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
            if lower < cutoff and time.monotonic() >= deadline:
                return total, False
        return total, True

    # -- reads -------------------------------------------------------------------------------

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query on the writer's connection (WAL readers never block the writer)."""
        if self._db is None and not self.read_only:
            async with self._tx_lock:  # a reconnect is under way
                pass
        if self._db is None:
            raise StoreError(f"{self.path} is not open")
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


def _last_events(events: Sequence[tuple[Any, ...]]) -> list[tuple[str, str]]:
    """(meta key, value) of the newest of `events` (as put_event takes them) per key."""
    newest: dict[str, str] = {}
    for t_ms, kind, name, target, state, reason, _ in events:
        key = f"{LAST_EVENT_PREFIX}{kind}|{name}|{target or ''}"
        newest[key] = json.dumps([kind, name, target, state, reason, t_ms])
    return list(newest.items())


def _write_mark(mark: Path, findings: list[str]) -> None:
    report = {"t_ms": now_ms(), "found": findings[:20]}
    mark.write_text(json.dumps(report) + "\n")
    os.chmod(mark, 0o600)


def _read_mark(mark: Path) -> list[str]:
    try:
        return list(json.loads(mark.read_text()).get("found", []))[:5]
    except (OSError, ValueError, AttributeError):
        return []


def _move_aside(path: Path, tag: str) -> None:
    for suffix in ("", "-wal", "-shm", INTEGRITY_MARK):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{path}{tag}{suffix}")


def _too_new(path: Path, version: int) -> str:
    return (
        f"{path} has schema version {version}, newer than this daisee-node "
        f"understands ({len(MIGRATIONS)}); upgrade daisee-node"
    )


# SQLite's primary result codes that say the file itself is damaged, and those that say another
# connection holds it (https://www.sqlite.org/rescode.html).
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_LOCKED_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED


def classify_error(exc: BaseException) -> str:
    """What kind of failure `exc` is: corrupt, locked, full (disk or quota), io or other."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            primary = code & 0xFF
            if primary in _CORRUPT_CODES:
                return "corrupt"
            if primary in _LOCKED_CODES:
                return "locked"
            if primary == 13:  # SQLITE_FULL
                return "full"
            if primary == 10:  # SQLITE_IOERR
                return "io"
            return "other"
        text = str(exc).lower()
        if "not a database" in text or "malformed" in text:
            return "corrupt"
        if "locked" in text or "busy" in text:
            return "locked"
        return "other"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return "full"
        return "io"
    return "other"


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


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and parents) as 0700, or tighten an existing one: it holds personal data."""
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(folder, 0o700, get_logger("store"))
    return folder


def _tighten(path: Path, mode: int, log: Any) -> None:
    """Remove group/other permissions from `path` if it has any (logged, since it is a change)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        try:
            os.chmod(path, (current | mode) & 0o700)
        except PermissionError as exc:
            log.warning("cannot tighten permissions", path=str(path), error=str(exc))
            return
        log.warning(
            "permissions tightened: household readings are personal data",
            path=str(path),
            was=oct(current),
            now=oct(stat.S_IMODE(path.stat().st_mode)),
        )


_WRITE_FAILURES = (sqlite3.Error, OSError)


def _release_statements() -> None:
    """Free statements still referenced from the tracebacks of failed writes.

    Python closes SQLite connections with `sqlite3_close_v2`, which keeps a connection (and its
    file locks) alive until its last statement is finalized; a failed write leaves one in a
    reference cycle. Without a collection, a connection opened next could find the file locked.
    """
    gc.collect()


def _is_write_failure(exc: BaseException) -> bool:
    """A failure of the disk or of access to it, as opposed to a bug in a statement."""
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return False
    return isinstance(exc, _WRITE_FAILURES)
