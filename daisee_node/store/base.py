"""What every part of the store shares: the file, the writer's connection, one write at a time.

`Store` (writer.py) is built from this base and three parts, each in its own module:
`IntegrityChecks` (integrity.py), `Maintenance` (retention.py) and `Reads` (queries.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from daisee_node.clock import Clock
from daisee_node.logs import get_logger
from daisee_node.readings import Channel, Reading
from daisee_node.store.errors import StoreError, is_write_failure, release_statements
from daisee_node.store.files import INTEGRITY_MARK
from daisee_node.store.schema import Schema
from daisee_node.store.settings import Retention

#: the writer's health, for `status`: a fixed-size file rewritten in place, so it can still be
#: updated when the disk is full
HEALTH_NAME = "store-health.json"
MINUTE_MS = 60_000
DAY_MS = 86_400_000

#: returns the time (ms) before which raw readings may be dropped, as far as its owner knows
RawReadingsHold = Callable[[], Awaitable[int]]


def now_ms() -> int:
    """Wall-clock time in ms (stamps of counters and marks, not of readings)."""
    return time.time_ns() // 1_000_000


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


class StoreBase:
    """The state of one node database and the one connection every write goes through."""

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
        self._schema = Schema.of_store()
        self._pending: list[Reading] = []
        # What the producers and the writer's thread share (`_pending`, counters, events, the
        # put and done counts) is guarded by `_lock`; `_cond` wakes the thread (writer.py).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # Held for every use of the connection that must not interleave with a commit: the
        # writer's thread holds it while it commits, the loop's writers (`_turn`) otherwise.
        self._conn_lock = threading.Lock()
        # The loop wants the connection: the thread starts no commit meanwhile, and resolves
        # `_conn_waiter` when it lets the connection go.
        self._loop_turn = False
        self._conn_waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The writer's thread (writer.py): it commits while `_fast`; `_idle` when it waits for
        # work with no timer running (a put must wake it); a failure it met, for the task.
        self._thread: threading.Thread | None = None
        self._fast = False
        self._idle = False
        self._thread_stop = False
        self._thread_failure: BaseException | None = None
        self._commit_asked = False
        # Commits the loop has not heard of yet: batches for `on_commit`, one notice for all.
        self._delivered: list[list[Reading]] = []
        self._notice_pending = False
        # Set by whatever gives the writer task work; `_waiter` is the task waiting for it. (A
        # bare future and a timer: `asyncio.wait_for` on an Event costs a task and several turns
        # of the loop.)
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = False
        self._channel_ids: dict[str, int] = {}
        self._channel_info: dict[str, Channel] = {}
        self._counter_adds: dict[str, int] = {}
        self._counter_sets: dict[str, int] = {}
        self._events: list[tuple[Any, ...]] = []
        self._next_maintenance = 0.0
        self._tx_lock = asyncio.Lock()
        # Readings put and readings committed (or dropped) so far: `flush` waits on these, since
        # under a steady stream the queue itself is never empty.
        self._put_count = 0
        self._done_count = 0
        #: `flush` callers: (put count to reach, future resolved once it is committed)
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: asked by retention before raw readings are dropped (see `add_retention_hold`)
        self._holds: list[RawReadingsHold] = []
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

    # -- the connection ----------------------------------------------------------------------

    async def _connect(self, exclusive: bool = False) -> None:
        # Shared with the writer's thread, which commits on it between the loop's turns.
        self._db = await aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
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

    async def _close_quietly(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close()
            self._db = None
            release_statements()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; writers take turns (they share the one connection)."""
        assert self._db is not None
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        async with self._turn():
            if self._schema.pending:
                await self._schema.migrate_pending(
                    self._db, self._transaction_held, self.path, self._log
                )
            async with self._transaction_held() as db:
                yield db

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """The connection for a write on the loop: no other such write and no commit in flight."""
        async with self._tx_lock:
            await self._take_connection()
            try:
                yield
            finally:
                self._conn_lock.release()
                with self._lock:
                    self._loop_turn = False
                    self._cond.notify_all()

    async def _take_connection(self) -> None:
        """Acquire `_conn_lock` without blocking the loop (the thread may be committing)."""
        with self._lock:
            self._loop_turn = True
        while not self._conn_lock.acquire(blocking=False):
            waiter = asyncio.get_running_loop().create_future()
            with self._lock:
                self._conn_waiter = waiter
            # The thread looks for a waiter after each release: either this try succeeds or
            # the waiter is resolved.
            if self._conn_lock.acquire(blocking=False):
                with self._lock:
                    self._conn_waiter = None
                return
            try:
                await waiter
            except BaseException:
                with self._lock:
                    self._loop_turn = False
                    self._conn_waiter = None
                    self._cond.notify_all()
                raise

    @contextlib.asynccontextmanager
    async def _transaction_held(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction, for a caller that holds the turn (`_turn`)."""
        assert self._db is not None
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
            if is_write_failure(exc):
                self._write_failed(exc)
            raise
        if self._failing_since_ms is not None:
            await self._write_recovered()

    async def _migrate_registered(self) -> None:
        """Run the migrations of owners registered since the file was opened."""
        if self._schema.pending and self._db is not None and not self.read_only:
            async with self._turn():
                await self._schema.migrate_pending(
                    self._db, self._transaction_held, self.path, self._log
                )

    # -- waking the writer ---------------------------------------------------------------------

    def _wake(self) -> None:
        """Give the writer a turn (it has readings, events or a stop to see to)."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_for_work(self, longest_s: float) -> None:
        """Return when woken, or after `longest_s` seconds."""
        if self._woken:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(longest_s, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    # -- write failures (the health file is kept in integrity.py) ------------------------------

    def _write_failed(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def _write_recovered(self) -> None:
        raise NotImplementedError

    # -- counters and meta -------------------------------------------------------------------

    def add_counter(self, name: str, delta: int) -> None:
        """Add to a persistent counter (written with the next batch)."""
        with self._lock:
            self._counter_adds[name] = self._counter_adds.get(name, 0) + delta

    def set_counter(self, name: str, value: int) -> None:
        """Set a persistent counter (written with the next batch)."""
        with self._lock:
            self._counter_sets[name] = value

    async def _meta_int(self, key: str) -> int | None:
        assert self._db is not None
        async with self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else None

    @property
    def pending(self) -> int:
        """Readings put and not yet committed."""
        return len(self._pending)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
