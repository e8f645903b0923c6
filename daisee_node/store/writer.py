"""The `Store`: open and migrate the file, queue readings, and the writer that commits them.

One writer owns every write (zigpy appdb style): sources call `put`/`put_many`, which never block
and never await; the writer commits what has arrived at most every `flush_interval_s`, in one
transaction, with the counters and events recorded since the last one.

The writer is two parts. A thread of its own takes what is pending (under a lock, with its own
flush timer) and commits it on the store's connection: a steady stream of small commits costs no
turn of the event loop, and the loop hears of a commit only when something waits on it (`flush`,
`on_commit`), one notice for all the commits made since the last. The writer task on the loop does
everything else: maintenance, the integrity check, write failures and their retries, reconnects,
new channels and migrations, and the drain at stop; whenever the thread meets one of these it
hands the pending work back to the task, which commits it through aiosqlite until all is well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from daisee_node.readings import Channel, Reading
from daisee_node.store.base import _resolve
from daisee_node.store.errors import (
    WRITE_FAILURES,
    StoreError,
    classify_error,
    is_write_failure,
    release_statements,
)
from daisee_node.store.events import (
    ADD_COUNTER,
    INSERT_EVENT,
    SET_COUNTER,
    SET_LAST_EVENT,
    last_events,
)
from daisee_node.store.files import ensure_private_dir, tighten
from daisee_node.store.integrity import IntegrityChecks, read_mark
from daisee_node.store.queries import Reads, readonly_uri
from daisee_node.store.retention import Maintenance

INSERT_READING = (
    "INSERT OR IGNORE INTO readings (t_ms, channel_id, value, quality) VALUES (?,?,?,?)"
)
UPSERT_LATEST = (
    "INSERT INTO latest (channel_id, t_ms, value, quality) VALUES (?,?,?,?) "
    "ON CONFLICT(channel_id) DO UPDATE SET t_ms=excluded.t_ms, value=excluded.value, "
    "quality=excluded.quality WHERE excluded.t_ms >= latest.t_ms"
)


class Store(IntegrityChecks, Maintenance, Reads):
    """The reading buffer: `put` from anywhere on the event loop, `run()` as the writer task.

    `read_only=True` is for commands that only look (status, prove, verify) beside a live node:
    the file is opened with SQLite's `mode=ro`, never created, migrated, tightened or moved.
    """

    # -- schema ------------------------------------------------------------------------------

    def register_migrations(self, owner: str, package: str) -> None:
        """Add the numbered migrations (package `package`) of a component that owns tables.

        Before `open`, they run with the store's own; after, before the next read or write.
        Registering the same owner again does nothing.
        """
        self._schema.register(owner, package)

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
                found=read_mark(self.integrity_mark),
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
            assert self._db is not None
            try:
                async with self._turn():
                    await self._schema.migrate(
                        self._db, self._transaction_held, self.path, self._log
                    )
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
            version = await self._schema.check_read_only(self._db, self.path)
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
            tighten(Path(f"{self.path}{suffix}"), 0o600, self._log)
        tighten(self.health_path, 0o600, self._log)
        try:
            self._write_health(force=True)
        except OSError as exc:
            self._log.warning("cannot write the store's health file", error=str(exc))

    async def _load_channels(self) -> None:
        assert self._db is not None
        async with self._db.execute("SELECT id, name FROM channels") as cur:
            self._channel_ids = {name: cid for cid, name in await cur.fetchall()}

    async def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        await self._stop_check()
        await self._end_thread()
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
            release_statements()
            with contextlib.suppress(OSError):
                self._write_health(force=True, closed=True)

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
        """Queue one reading for the next commit (never blocks)."""
        with self._lock:
            self._pending.append(reading)
            self._put_count += 1
            self._trim_pending()
            self._signal()

    def put_many(self, readings: Sequence[Reading]) -> None:
        """Queue readings for the next commit (never blocks)."""
        with self._lock:
            self._pending.extend(readings)
            self._put_count += len(readings)
            self._trim_pending()
            self._signal()

    def _after_put(self) -> None:
        with self._lock:
            self._trim_pending()
            self._signal()

    def _signal(self) -> None:
        """Tell whoever commits now that there is work: the thread if idle, else the task."""
        if self._fast:
            if self._idle:
                self._cond.notify()
        else:
            self._wake()

    def _trim_pending(self) -> None:
        """Keep the backlog within `max_pending` (with `_lock` held)."""
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
        with self._lock:
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
            self._signal()

    async def set_meta(self, key: str, value: str) -> None:
        """Set a meta key at once, in its own transaction."""
        async with self.transaction() as db:
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- the writer task -------------------------------------------------------------------

    async def run(self) -> None:
        """The writer. Returns after `stop()`, once everything pending is committed.

        A failing write (disk full, I/O error, a lock held elsewhere) does not end the task: the
        batch stays in memory (bounded by `max_pending`, oldest dropped first), the error is
        counted, and the write is tried again after a growing pause, until it succeeds.
        """
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only; it has no writer")
        if self._db is None:
            await self.open()
        self._next_check = time.monotonic() + self.retention.integrity_delay_s
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._fast = self._can_go_fast()
            self._thread_stop = False
        self._thread = threading.Thread(target=self._thread_main, name="store.writer", daemon=True)
        self._thread.start()
        try:
            await self._run()
        finally:
            await self._end_thread()
            await self._stop_check()

    def _can_go_fast(self) -> bool:
        """Whether the thread may commit: nothing the task alone can see to is under way."""
        return (
            not self._stopping
            and self._db is not None
            and not self._exclusive
            and self._failing_since_ms is None
            and not self._schema.pending
        )

    async def _run(self) -> None:
        last_commit = 0.0
        retry_s = 0.0
        while True:
            if not self._stopping:
                self._start_scheduled_check()
            if not (self._stopping or self._thread_failure or self._task_has_work()):
                self._woken = False
                due = self._next_maintenance - self.clock.now()
                # An unfinished maintenance turn (a backlog) goes on at once.
                timeout = 0.0 if due <= 0 else max(0.05, due / self.clock.speed)
                if retry_s:
                    timeout = min(timeout, retry_s)
                if self._check_task is None:
                    timeout = min(timeout, max(0.05, self._next_check - time.monotonic()))
                await self._wait_for_work(min(timeout, 5.0))
            if self._stopping:
                # Whatever the thread had in flight is committed or back in `_pending`.
                async with self._turn():
                    pass
            failure, self._thread_failure = self._thread_failure, None
            if failure is not None:
                if not is_write_failure(failure):
                    raise failure
                if not self._stopping:
                    # Counted and logged by the thread; the task retries from here on.
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread(self._write_health)
                    last_commit = time.monotonic()
                    retry_s = min(self.retention.retry_max_s, max(0.25, retry_s * 2))
                    self._next_maintenance = (
                        self.clock.now() + self.retention.maintenance_interval_s
                    )
                    continue
            if self._stopping and not self._pending:
                with contextlib.suppress(*WRITE_FAILURES):
                    await self._write_batch([])  # counters
                self._settle_waiters()
                return
            since = time.monotonic() - last_commit
            wait = max(self.retention.flush_interval_s, retry_s)
            if not self._stopping and since < wait and self._task_has_work():
                await asyncio.sleep(wait - since)
            try:
                if self._db is None:  # a reconnect failed: try again
                    async with self._turn():
                        await self._connect(exclusive=True)
                if not self._fast and (
                    self._pending or self._counter_adds or self._counter_sets or self._events
                ):
                    with self._lock:
                        batch, self._pending = self._pending, []
                    last_commit = time.monotonic()
                    await self._write_batch(batch)
                    if self._exclusive:
                        await self._reconnect_shared()
                elif self._fast and (self._counter_adds or self._counter_sets):
                    # Counters with no reading to ride along: the thread writes them alone.
                    with self._lock:
                        self._commit_asked = True
                        if self._idle:
                            self._cond.notify()
                if self.clock.now() >= self._next_maintenance and not self._stopping:
                    await self.maintain(budget_s=self.retention.maintenance_budget_s)
            except WRITE_FAILURES as exc:
                if not is_write_failure(exc):
                    raise
                if self._stopping:
                    self._log.error(
                        "store stopped with readings not written",
                        lost=self.pending,
                        error=str(exc),
                    )
                    with self._lock:
                        self._done_count += self.pending
                    self._settle_waiters()
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
            if not self._fast and self._can_go_fast():
                with self._lock:
                    self._fast = True
                    self._cond.notify()

    def _task_has_work(self) -> bool:
        """Readings or events the task (not the thread) is to commit."""
        return not self._fast and bool(self._pending or self._events)

    async def _reconnect_shared(self) -> None:
        """Leave exclusive mode once writes work again, so other programs can read."""
        async with self._turn():  # no transaction may start on the connection being replaced
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
        with self._lock:
            self._fast = False
            self._cond.notify()
        self._wake()

    async def flush(self) -> None:
        """Wait until everything put so far is committed (the writer must be running)."""
        target = self._put_count
        while True:
            with self._lock:
                if self._done_count >= target:
                    return
                waiter = asyncio.get_running_loop().create_future()
                self._flush_waiters.append((target, waiter))
                self._signal()
            await waiter

    def _settle_waiters(self) -> None:
        """Resolve the `flush` callers whose readings are all committed (on the loop)."""
        with self._lock:
            done = self._done_count
            ready = [w for t, w in self._flush_waiters if t <= done]
            self._flush_waiters = [
                (t, w) for t, w in self._flush_waiters if t > done and not w.done()
            ]
        for waiter in ready:
            if not waiter.done():
                waiter.set_result(None)

    async def _write_batch(self, batch: list[Reading]) -> None:
        """Commit `batch` with the counters and events recorded so far, through aiosqlite."""
        assert self._db is not None
        # Taken before the first await: what arrives while this batch commits goes in the next.
        with self._lock:
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
            t0 = time.perf_counter()
            inserted = await self._commit(
                rows,
                [(c, t, v, q) for (t, c, v, q) in latest.values()],
                adds,
                sets,
                events,
                self.clock.now_ms(),
            )
        except BaseException:
            # Nothing is lost: the batch and the counters go back in front of what came since
            # (within the backlog's bound: the oldest readings are dropped first, counted).
            self._restore(batch, adds, sets, events)
            self._after_put()
            raise
        with self._lock:
            self._done_count += len(batch)
            self._count_commit(len(rows), inserted, time.perf_counter() - t0)
        if batch:
            for callback in self.on_commit:
                callback(batch)
        self._settle_waiters()

    def _restore(
        self,
        batch: list[Reading],
        adds: dict[str, int],
        sets: dict[str, int],
        events: list[tuple[Any, ...]],
    ) -> None:
        """Put a batch that was not committed back in front of what came since."""
        with self._lock:
            self._pending[:0] = batch
            self._trim_pending()
            for k, v in adds.items():
                self._counter_adds[k] = self._counter_adds.get(k, 0) + v
            for k, v in sets.items():
                self._counter_sets.setdefault(k, v)
            self._events[:0] = events

    def _count_commit(self, rows: int, inserted: int, took_s: float) -> None:
        s = self.stats
        s.written += inserted
        s.duplicates += rows - inserted
        s.batches += 1 if rows else 0
        s.last_batch = rows
        s.last_commit_s = took_s

    async def _commit(
        self,
        rows: Sequence[tuple[int, int, float, int]],
        latest: Sequence[tuple[int, int, float, int]],
        adds: dict[str, int],
        sets: dict[str, int],
        events: list[tuple[Any, ...]],
        now_ms: int,
    ) -> int:
        """One batch in one transaction, in one trip to the database thread; rows inserted.

        `transaction()` takes a trip per statement (about 40 µs of CPU each here, 10–20 times
        that on a Pi); a batch every 0.25 s makes that the writer's main cost.
        """
        async with self._turn():
            db = self._db  # read under the lock: a reconnect replaces it under the lock too
            assert db is not None
            if self._schema.pending:
                await self._schema.migrate_pending(db, self._transaction_held, self.path, self._log)
            try:
                # aiosqlite's queue to its thread (private: aiosqlite has no public way to run a
                # function there); the function's own try/ROLLBACK ends a failed transaction.
                inserted: int = await db._execute(
                    commit_batch, db._conn, rows, latest, adds, sets, events, now_ms
                )
            except BaseException as exc:
                if is_write_failure(exc):
                    self._write_failed(exc)
                raise
            if self._failing_since_ms is not None:
                await self._write_recovered()
        return inserted

    # -- the writer's thread ---------------------------------------------------------------

    def _thread_main(self) -> None:
        """Commit what is pending at most every `flush_interval_s`, while the task lets it."""
        last_commit = 0.0
        while True:
            with self._lock:
                while True:
                    if self._thread_stop:
                        return
                    if self._fast and not self._loop_turn:
                        # The interval runs out whether work has come or not, so a producer
                        # putting at the flush pace never has to wake the thread: one wake per
                        # commit (waking it on a put and then waiting out the rest would be two).
                        due = last_commit + self.retention.flush_interval_s - time.monotonic()
                        if due > 0:
                            self._cond.wait(due)
                            continue
                        if self._thread_has_work():
                            break
                    self._idle = True
                    try:
                        self._cond.wait()
                    finally:
                        self._idle = False
            self._conn_lock.acquire()
            try:
                last_commit = time.monotonic()
                self._commit_in_thread()
            finally:
                self._conn_lock.release()
                with self._lock:
                    waiter, self._conn_waiter = self._conn_waiter, None
                if waiter is not None:
                    self._call_loop(_resolve, waiter)

    def _thread_has_work(self) -> bool:
        return bool(self._pending or self._events or self._commit_asked)

    def _commit_in_thread(self) -> None:
        """One batch, taken and committed in the thread (holding `_conn_lock`)."""
        with self._lock:
            if not (self._fast and self._thread_has_work()):
                return
            db = self._db
            ids = self._channel_ids
            if db is None or self._schema.pending:
                # A migration or a reconnect: the task's to see to.
                self._hand_over(None)
                return
            batch, self._pending = self._pending, []
            adds, self._counter_adds = self._counter_adds, {}
            sets, self._counter_sets = self._counter_sets, {}
            events, self._events = self._events, []
            self._commit_asked = False
        t0 = time.perf_counter()
        try:
            rows = [(r.t_ms, ids[r.channel], r.value, r.quality) for r in batch]
        except KeyError:
            # A new channel: the task registers it (through aiosqlite) and commits the batch.
            self._restore(batch, adds, sets, events)
            with self._lock:
                self._hand_over(None)
            return
        try:
            latest = {row[1]: row for row in rows}
            inserted = commit_batch(
                db._conn,
                rows,
                [(c, t, v, q) for (t, c, v, q) in latest.values()],
                adds,
                sets,
                events,
                self.clock.now_ms(),
            )
        except BaseException as exc:
            self._restore(batch, adds, sets, events)
            with self._lock:
                if is_write_failure(exc):
                    self._write_failed(exc)
                self._hand_over(exc)
            return
        with self._lock:
            self._done_count += len(batch)
            self._count_commit(len(rows), inserted, time.perf_counter() - t0)
            if batch and self.on_commit:
                self._delivered.append(batch)
            notify = bool(self._flush_waiters or self._delivered) and not self._notice_pending
            if notify:
                self._notice_pending = True
        if notify:
            self._call_loop(self._deliver)

    def _hand_over(self, failure: BaseException | None) -> None:
        """Give the pending work back to the task (with `_lock` held)."""
        self._fast = False
        if failure is not None:
            self._thread_failure = failure
        self._call_loop(self._wake)

    def _deliver(self) -> None:
        """On the loop: the commits the thread made since the last notice."""
        with self._lock:
            self._notice_pending = False
            batches, self._delivered = self._delivered, []
        try:
            for batch in batches:
                for callback in self.on_commit:
                    callback(batch)
        finally:
            self._settle_waiters()

    def _call_loop(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(callback, *args)

    async def _end_thread(self) -> None:
        """Stop the writer's thread (once a commit in flight is done) and wait for it."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._thread_stop = True
            self._fast = False
            self._cond.notify_all()
        await asyncio.to_thread(thread.join)
        self._thread = None

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


def commit_batch(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[int, int, float, int]],
    latest: Sequence[tuple[int, int, float, int]],
    adds: dict[str, int],
    sets: dict[str, int],
    events: list[tuple[Any, ...]],
    now_ms: int,
) -> int:
    """Write a batch in one transaction (in the database thread); how many readings were new."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        inserted = 0
        if rows:
            inserted = conn.executemany(INSERT_READING, rows).rowcount
            conn.executemany(UPSERT_LATEST, latest)
        counted = dict(adds)
        if inserted:
            counted["readings_stored"] = counted.get("readings_stored", 0) + inserted
        if counted:
            conn.executemany(ADD_COUNTER, [(k, v, now_ms) for k, v in counted.items()])
        if sets:
            conn.executemany(SET_COUNTER, [(k, v, now_ms) for k, v in sets.items()])
        if events:
            conn.executemany(INSERT_EVENT, events)
            conn.executemany(SET_LAST_EVENT, last_events(events))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        raise
    return inserted
