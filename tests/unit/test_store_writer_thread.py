"""The writer's thread: steady commits off the event loop, and each hand-over to the task."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daisee_node.readings import Reading
from daisee_node.store import MINUTE_MS, Retention, Store
from daisee_node.store import writer as writer_module
from tests.conftest import until
from tests.support.clocks import FixedClock

T0 = 1_781_000_000_000 // MINUTE_MS * MINUTE_MS


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def batch(first: int, n: int = 8) -> list[Reading]:
    return [Reading(f"c{i % 8}.x_w", T0 + first + i, float(first + i)) for i in range(n)]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(
        tmp_path / "node.db", clock=FixedClock(T0), retention=Retention(flush_interval_s=0.005)
    )
    await s.open()
    writer = asyncio.create_task(s.run(), name="store.writer")
    # The channels exist after one commit (made by the task): later ones are the thread's.
    s.put_many(batch(0))
    await s.flush()
    yield s
    s.stop()
    await writer
    await s.close()


def record_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads `commit_batch` runs in, in order."""
    names: list[str] = []
    real = writer_module.commit_batch

    def recording(*args: Any) -> int:
        names.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(writer_module, "commit_batch", recording)
    return names


def count_threadsafe_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What is scheduled on the running loop from other threads (by callback name)."""
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Callable[..., object], *args: Any, **kw: Any) -> asyncio.Handle:
        calls.append(getattr(callback, "__name__", repr(callback)))
        return real(callback, *args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    return calls


async def test_a_steady_stream_is_committed_in_the_writers_thread_without_waking_the_loop(
    running: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = record_threads(monkeypatch)
    scheduled = count_threadsafe_calls(monkeypatch)
    before = running.stats.batches

    def committed(n: int) -> bool:
        return running.stats.batches >= n

    for k in range(1, 21):
        running.put_many(batch(100 * k))
        await until(functools.partial(committed, before + k))
    assert running.stats.written == 21 * 8
    assert threads and set(threads) == {"store.writer"}
    # Nobody waited on these commits (no flush, no on_commit): the loop was never told.
    assert "_deliver" not in scheduled


async def test_on_commit_runs_on_the_loop_with_every_batch_and_flush_waiters_are_released(
    running: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.current_thread()
    seen: list[Reading] = []
    where: set[threading.Thread] = set()

    def on_commit(readings: Any) -> None:
        where.add(threading.current_thread())
        seen.extend(readings)

    running.on_commit.append(on_commit)
    scheduled = count_threadsafe_calls(monkeypatch)
    expected: list[Reading] = []
    for k in range(1, 11):
        b = batch(100 * k)
        expected.extend(b)
        running.put_many(b)
    # Several callers waiting at once are all released by the commits' notices.
    await asyncio.wait_for(asyncio.gather(*(running.flush() for _ in range(5))), 10)
    assert sorted(seen, key=lambda r: (r.t_ms, r.channel)) == sorted(
        expected, key=lambda r: (r.t_ms, r.channel)
    )
    assert where == {loop_thread}
    # One notice per commit at most, never one per reading or per waiter.
    assert 1 <= scheduled.count("_deliver") <= running.stats.batches


async def test_a_transaction_on_the_loop_never_interleaves_with_a_commit(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = writer_module.commit_batch
    in_commit = threading.Event()
    release = threading.Event()

    def held(*args: Any) -> int:
        in_commit.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(writer_module, "commit_batch", held)
    running.put_many(batch(100))
    await until(in_commit.is_set)
    entered = asyncio.Event()

    async def meta() -> None:
        async with running.transaction() as db:
            entered.set()
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('k', 'v')")

    task = asyncio.create_task(meta())
    # The transaction waits for the commit in flight (the loop itself is not blocked: this
    # coroutine runs).
    await until(lambda: running._loop_turn)
    assert not entered.is_set()
    release.set()
    await asyncio.wait_for(task, 10)
    assert entered.is_set()

    # While a transaction is open, the thread starts no commit; once it ends, it does.
    monkeypatch.setattr(writer_module, "commit_batch", real)
    async with running.transaction():
        running.put_many(batch(200))
        await until(lambda: running._idle)
        assert running.pending == 8
    await asyncio.wait_for(running.flush(), 10)
    assert rows(tmp_path / "node.db", "SELECT count(*) FROM readings") == [(24,)]
    assert rows(tmp_path / "node.db", "SELECT value FROM meta WHERE key = 'k'") == [("v",)]


async def test_a_new_channel_is_handed_to_the_task_and_the_thread_takes_over_again(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = record_threads(monkeypatch)
    running.put(Reading("new.y_w", T0 + 5, 5.0))
    await asyncio.wait_for(running.flush(), 10)
    assert threads[-1] != "store.writer"  # registered and committed through aiosqlite
    running.put_many([*batch(300), Reading("new.y_w", T0 + 6, 6.0)])
    await asyncio.wait_for(running.flush(), 10)
    assert threads[-1] == "store.writer"
    assert rows(
        tmp_path / "node.db",
        "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
        "WHERE c.name = 'new.y_w'",
    ) == [(2,)]


async def test_after_a_failed_commit_the_task_retries_and_the_thread_resumes(
    running: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = writer_module.commit_batch
    calls: list[str] = []

    def failing_once(*args: Any) -> int:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args)

    monkeypatch.setattr(writer_module, "commit_batch", failing_once)
    running.put_many(batch(100))
    await asyncio.wait_for(running.flush(), 10)
    assert calls[0] == "store.writer" and calls[1] != "store.writer"
    assert running.healthy and running.stats.write_errors == 1
    running.put_many(batch(200))
    await asyncio.wait_for(running.flush(), 10)
    assert calls[-1] == "store.writer"
    assert rows(tmp_path / "node.db", "SELECT count(*) FROM readings") == [(24,)]
    counters = dict(rows(tmp_path / "node.db", "SELECT name, value FROM counters"))
    assert counters["store.write_errors"] == 1


async def test_stop_during_a_commit_in_the_thread_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(
        tmp_path / "node.db", clock=FixedClock(T0), retention=Retention(flush_interval_s=0.005)
    )
    await s.open()
    writer = asyncio.create_task(s.run())
    s.put_many(batch(0))
    await s.flush()
    real = writer_module.commit_batch
    in_commit = threading.Event()
    release = threading.Event()

    def held(*args: Any) -> int:
        in_commit.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(writer_module, "commit_batch", held)
    s.put_many(batch(100))
    await until(in_commit.is_set)
    s.put_many(batch(200))  # arrives while the first is in flight
    s.add_counter("sensor.x.reads", 3)
    s.stop()
    release.set()
    await asyncio.wait_for(writer, 10)
    await s.close()
    assert s._thread is None
    assert rows(tmp_path / "node.db", "SELECT count(*) FROM readings") == [(24,)]
    counters = dict(rows(tmp_path / "node.db", "SELECT name, value FROM counters"))
    assert counters["sensor.x.reads"] == 3
    assert counters["readings_stored"] == 24


async def test_counters_alone_are_written_by_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short maintenance interval wakes the task, which asks the thread for a commit.
    s = Store(
        tmp_path / "node.db",
        clock=FixedClock(T0),
        retention=Retention(flush_interval_s=0.005, maintenance_interval_s=0.1),
    )
    await s.open()
    writer = asyncio.create_task(s.run())
    try:
        s.put_many(batch(0))
        await s.flush()
        threads = record_threads(monkeypatch)
        s.set_counter("relay.r1.state", 1)
        await until(
            lambda: (
                rows(
                    tmp_path / "node.db", "SELECT value FROM counters WHERE name = 'relay.r1.state'"
                )
                == [(1,)]
            )
        )
        assert "store.writer" in threads
    finally:
        s.stop()
        await writer
        await s.close()
