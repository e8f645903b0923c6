"""The SQLite buffer, against a real SQLite file: batching, migrations, rollup, retention."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import statistics
import threading
from pathlib import Path

import pytest

from daisee_node.ledger.outbox import Outbox
from daisee_node.readings import Channel, Quality, Reading
from daisee_node.store import DAY_MS, MIGRATIONS, MINUTE_MS, Retention, Store, StoreError
from daisee_node.store import writer as writer_module
from tests.support.clocks import FixedClock

T0 = 1_781_000_000_000 // MINUTE_MS * MINUTE_MS  # a minute boundary in 2026


@pytest.fixture
async def store(tmp_path: Path):
    s = Store(
        tmp_path / "node.db", clock=FixedClock(T0), retention=Retention(flush_interval_s=0.01)
    )
    await s.open()
    writer = asyncio.create_task(s.run())
    yield s
    s.stop()
    await writer
    await s.close()


def rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_readings_round_trip_with_quality_and_nan(store: Store) -> None:
    store.declare([Channel("grid.power_w", "W")])
    sent = [
        Reading("grid.power_w", T0 + 1000, 12.5),
        Reading("grid.power_w", T0 + 2000, math.nan, Quality.SOURCE_ERROR),
        Reading("grid.power_w", T0 + 3000, -3.25, Quality.OUT_OF_RANGE),
    ]
    store.put_many(sent)
    await store.flush()
    got = await store.readings("grid.power_w", T0, T0 + 10_000)
    assert [(r.t_ms, r.quality) for r in got] == [(r.t_ms, r.quality) for r in sent]
    assert got[0].value == 12.5 and math.isnan(got[1].value) and got[2].value == -3.25
    assert (await store.query("SELECT unit FROM channels"))[0][0] == "W"


async def test_many_readings_arrive_in_few_transactions(store: Store) -> None:
    for i in range(20_000):
        store.put(Reading(f"ch.c{i % 8}_w", T0 + i, float(i)))
    await store.flush()
    assert store.stats.written == 20_000
    assert store.stats.batches <= 3
    (count,) = (await store.query("SELECT count(*) FROM readings"))[0]
    assert count == 20_000


async def test_duplicates_are_ignored_and_counted(store: Store) -> None:
    store.put(Reading("a.x_w", T0, 1.0))
    await store.flush()
    store.put_many([Reading("a.x_w", T0, 2.0), Reading("a.x_w", T0 + 1, 3.0)])
    await store.flush()
    assert store.stats.duplicates == 1
    got = await store.readings("a.x_w", T0, T0 + 10)
    assert [r.value for r in got] == [1.0, 3.0]  # the first value at a time wins


async def test_latest_keeps_the_newest_value_per_channel(store: Store) -> None:
    store.put_many([Reading("a.x_w", T0 + 5, 5.0), Reading("a.x_w", T0 + 9, 9.0)])
    await store.flush()
    store.put(Reading("a.x_w", T0 + 7, 7.0))  # late, older reading
    await store.flush()
    assert await store.query("SELECT t_ms, value FROM latest") == [(T0 + 9, 9.0)]


async def test_counters_persist_and_add_up(tmp_path: Path, store: Store) -> None:
    store.add_counter("sensor.pv.reads", 3)
    store.add_counter("sensor.pv.reads", 4)
    store.put(Reading("a.x_w", T0, 1.0))
    await store.flush()
    store.add_counter("sensor.pv.reads", 1)
    store.put(Reading("a.x_w", T0 + 1, 1.0))
    await store.flush()
    counters = dict(await store.query("SELECT name, value FROM counters"))
    assert counters["sensor.pv.reads"] == 8
    assert counters["readings_stored"] == 2


async def test_backlog_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    s = Store(tmp_path / "node.db", retention=Retention(max_pending=1000))
    for i in range(1500):
        s.put(Reading("a.x_w", T0 + i, float(i)))
    assert s.pending == 1000
    assert s.stats.dropped == 500
    await s.open()
    s.stop()
    await s.run()
    await s.close()
    kept = rows(tmp_path / "node.db", "SELECT min(t_ms), count(*) FROM readings")
    assert kept == [(T0 + 500, 1000)]


async def test_a_failed_write_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    s = Store(tmp_path / "node.db", retention=Retention(flush_interval_s=0.01))
    await s.open()
    s.put_many([Reading("a.x_w", T0 + i, float(i)) for i in range(100)])
    real = writer_module.commit_batch
    calls = {"n": 0}

    def failing_once(conn, *args):
        # In the database thread, where a failing disk fails the batch.
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(conn, *args)

    monkeypatch.setattr(writer_module, "commit_batch", failing_once)
    writer = asyncio.create_task(s.run())
    await s.flush()  # the writer retries the batch it failed to write
    assert s.stats.write_errors == 1 and s.healthy and s.last_error is None
    s.put(Reading("a.x_w", T0 + 100, 100.0))
    s.stop()
    await writer
    await s.close()
    assert rows(tmp_path / "node.db", "SELECT count(*) FROM readings") == [(101,)]
    counters = dict(rows(tmp_path / "node.db", "SELECT name, value FROM counters"))
    assert counters["store.write_errors"] == 1


async def test_migrations_number_the_schema(tmp_path: Path) -> None:
    async with Store(tmp_path / "node.db"):
        pass
    assert rows(tmp_path / "node.db", "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert rows(tmp_path / "node.db", "PRAGMA journal_mode") == [("wal",)]
    async with Store(tmp_path / "node.db"):  # opening again migrates nothing, keeps data
        pass
    assert rows(tmp_path / "node.db", "PRAGMA user_version") == [(len(MIGRATIONS),)]


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "node.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 5}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await Store(tmp_path / "node.db").open()


async def test_a_corrupt_database_is_moved_aside_and_the_node_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\x13" * 8192)
    s = Store(path)
    await s.open()
    s.put(Reading("a.x_w", T0, 1.0))
    s.stop()
    await s.run()
    await s.close()
    kept = list(tmp_path.glob("node.db.corrupt-*"))
    assert kept and kept[0].read_bytes().startswith(b"SQLite format 3")
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert rows(path, "SELECT count(*) FROM readings") == [(1,)]


def minute_series() -> list[Reading]:
    """Ten minutes of two channels, with a bad reading now and then."""
    out = []
    for i in range(600):
        t = T0 + i * 1000
        out.append(Reading("pv.power_w", t, 100 + 50 * math.sin(i / 17)))
        quality = Quality.SOURCE_ERROR if i % 13 == 0 else Quality.GOOD
        value = math.nan if quality else float(i % 60)
        out.append(Reading("load.power_w", t, value, quality))
    return out


async def test_rollup_summarises_each_minute(tmp_path: Path) -> None:
    clock = FixedClock(T0)
    s = Store(tmp_path / "node.db", clock=clock)
    await s.open()
    series = minute_series()
    s.put_many(series)
    s.stop()
    await s.run()
    await s.maintain(now_ms=T0 + 10 * MINUTE_MS + 10_000)
    got = {
        (c, m): rest
        for m, c, *rest in await s.query(
            "SELECT a.minute, c.name, a.min, a.max, a.mean, a.last, a.count, a.bad "
            "FROM readings_1m a JOIN channels c ON c.id = a.channel_id"
        )
    }
    await s.close()
    assert len(got) == 20
    for channel in ("pv.power_w", "load.power_w"):
        for m in range(10):
            minute = T0 // MINUTE_MS + m
            ours = [r for r in series if r.channel == channel and r.t_ms // MINUTE_MS == minute]
            good = [r.value for r in ours if r.good]
            mn, mx, mean, last, count, bad = got[(channel, minute)]
            assert (mn, mx, count, bad) == (min(good), max(good), len(good), len(ours) - len(good))
            assert mean == pytest.approx(statistics.fmean(good))
            assert last == [r.value for r in ours if r.good][-1]


async def test_rollup_waits_for_the_minute_to_end(tmp_path: Path) -> None:
    s = Store(tmp_path / "node.db", clock=FixedClock(T0))
    await s.open()
    s.put_many(minute_series())
    s.stop()
    await s.run()
    first = T0 // MINUTE_MS
    # Minute 1 ended a second ago, within the grace for late readings: only minute 0 is done.
    await s.maintain(now_ms=T0 + 2 * MINUTE_MS + 1000)
    done_early = [m for (m,) in await s.query("SELECT DISTINCT minute FROM readings_1m")]
    await s.maintain(now_ms=T0 + 2 * MINUTE_MS + 6000)
    done_later = [m for (m,) in await s.query("SELECT DISTINCT minute FROM readings_1m")]
    await s.close()
    assert sorted(done_early) == [first]
    assert sorted(done_later) == [first, first + 1]


async def test_retention_keeps_raw_days_then_aggregates(tmp_path: Path) -> None:
    retention = Retention(raw_days=2, aggregate_days=5)
    s = Store(tmp_path / "node.db", retention=retention, clock=FixedClock(T0))
    await s.open()
    # One reading a minute for 6 days.
    s.put_many([Reading("a.x_w", T0 + k * MINUTE_MS, float(k)) for k in range(6 * 24 * 60)])
    s.stop()
    await s.run()
    now = T0 + 6 * DAY_MS
    await s.maintain(now_ms=now)
    raw_min, raw_count = (await s.query("SELECT min(t_ms), count(*) FROM readings"))[0]
    agg_min = (await s.query("SELECT min(minute) FROM readings_1m"))[0][0]
    stored = dict(await s.query("SELECT name, value FROM counters"))
    await s.close()
    assert raw_min >= now - 2 * DAY_MS
    assert raw_count == 2 * 24 * 60
    assert agg_min * MINUTE_MS >= now - 5 * DAY_MS
    assert agg_min * MINUTE_MS < now - 4 * DAY_MS  # and no more than needed was dropped
    assert stored["readings_stored"] == raw_count


async def test_raw_readings_are_never_dropped_before_they_are_summarised(tmp_path: Path) -> None:
    s = Store(tmp_path / "node.db", retention=Retention(raw_days=1), clock=FixedClock(T0))
    await s.open()
    s.put_many([Reading("a.x_w", T0 + k * MINUTE_MS, 1.0) for k in range(3 * 24 * 60)])
    s.stop()
    await s.run()
    # Pretend the rollup is stuck at the start: nothing may be deleted.
    await s.query("INSERT INTO meta (key, value) VALUES ('rollup_until_ms', ?)", (str(T0),))
    await s._expire(T0 + 3 * DAY_MS)
    (count,) = (await s.query("SELECT count(*) FROM readings"))[0]
    await s.close()
    assert count == 3 * 24 * 60


async def test_counters_added_during_a_commit_are_kept(tmp_path: Path, monkeypatch) -> None:
    s = Store(tmp_path / "node.db", retention=Retention(flush_interval_s=0.01))
    await s.open()
    real = writer_module.commit_batch
    loop = asyncio.get_running_loop()
    counted = threading.Event()

    def slow(*args):
        # While this batch is in flight (in the database thread), a sensor counts three reads
        # on the event loop; the batch commits once they are counted.
        for _ in range(3):
            loop.call_soon_threadsafe(s.add_counter, "sensor.x.reads", 1)
        loop.call_soon_threadsafe(counted.set)
        counted.wait(5)
        return real(*args)

    monkeypatch.setattr(writer_module, "commit_batch", slow)
    s.add_counter("sensor.x.reads", 1)
    s.put(Reading("a.x_w", T0, 1.0))
    writer = asyncio.create_task(s.run())
    await s.flush()
    monkeypatch.setattr(writer_module, "commit_batch", real)
    s.put(Reading("a.x_w", T0 + 1, 1.0))
    await s.flush()
    s.stop()
    await writer
    await s.close()
    # 1 before the batch + 3 counted while the first batch was in flight.
    assert rows(
        tmp_path / "node.db", "SELECT value FROM counters WHERE name = 'sensor.x.reads'"
    ) == [(4,)]


async def test_flush_returns_under_a_steady_stream(store: Store) -> None:
    """The queue is never empty while sensors publish; flush must still return, and only once
    everything put before it is durable."""
    stop = asyncio.Event()

    async def producer() -> None:
        t = T0
        while not stop.is_set():
            t += 1
            store.put(Reading("s.x", t, 1.0, Quality.GOOD))
            await asyncio.sleep(0)

    task = asyncio.create_task(producer())
    try:
        await asyncio.sleep(0.1)
        marker = Reading("s.marker", T0, 42.0, Quality.GOOD)
        store.put(marker)
        # A bound for "it returns at all", not a speed: the producer never yields the loop for
        # long, and on a loaded 2-core machine the writer thread shares the GIL with it.
        await asyncio.wait_for(store.flush(), 30)
        stored = rows(
            store.path,
            "SELECT count(*) FROM readings r JOIN channels c "
            "ON c.id = r.channel_id WHERE c.name = 's.marker'",
        )
        assert stored == [(1,)]
    finally:
        # Stopped whatever happened: an endless producer would hold the store's close for ever.
        stop.set()
        await task


async def test_a_writer_cancelled_while_beginning_leaves_no_transaction_open(store: Store) -> None:
    """A ledger task cancelled at shutdown, while its BEGIN waited on the database thread, must
    not leave the shared connection inside a transaction (the writer could never BEGIN again)."""

    async def holder() -> None:
        async with store.transaction():
            await asyncio.sleep(10)

    for _ in range(20):
        task = asyncio.create_task(holder())
        await asyncio.sleep(0)  # BEGIN is now queued on the database thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    store.put(Reading("s.after", T0, 1.0, Quality.GOOD))
    await asyncio.wait_for(store.flush(), 5)
    assert rows(store.path, "SELECT count(*) FROM readings") == [(1,)]


async def test_a_retention_hold_keeps_raw_readings_until_it_lets_go(tmp_path: Path) -> None:
    """Raw readings from a hold's answer on stay past raw_days; the hold is asked at each turn."""
    s = Store(tmp_path / "node.db", retention=Retention(raw_days=1), clock=FixedClock(T0))
    await s.open()
    held = {"until": T0}
    asked: list[int] = []

    async def hold() -> int:
        asked.append(held["until"])
        return held["until"]

    s.add_retention_hold(hold)
    s.put_many([Reading("a.x_w", T0 + k * MINUTE_MS, 1.0) for k in range(3 * 24 * 60)])
    s.stop()
    await s.run()
    now = T0 + 3 * DAY_MS
    await s.maintain(now_ms=now)
    (kept,) = (await s.query("SELECT count(*) FROM readings"))[0]
    held["until"] = T0 + DAY_MS
    await s.maintain(now_ms=now)
    (oldest,) = (await s.query("SELECT min(t_ms) FROM readings"))[0]
    held["until"] = now
    await s.maintain(now_ms=now)
    (oldest_free,) = (await s.query("SELECT min(t_ms) FROM readings"))[0]
    await s.close()
    assert kept == 3 * 24 * 60
    assert oldest == T0 + DAY_MS
    assert oldest_free == now - DAY_MS  # then raw_days rules again
    assert asked == [T0, T0 + DAY_MS, now]


async def test_with_a_ledger_unsealed_readings_outlive_retention(tmp_path: Path) -> None:
    """Readings of periods not yet sealed into a commitment are kept past raw_days."""
    s = Store(tmp_path / "node.db", retention=Retention(raw_days=1), clock=FixedClock(T0))
    await s.open()
    Outbox(s).keep_unsealed_readings()  # what the ledger does when the node has one
    s.put_many([Reading("a.x_w", T0 + k * MINUTE_MS, 1.0) for k in range(3 * 24 * 60)])
    s.stop()
    await s.run()
    now = T0 + 3 * DAY_MS
    await s.maintain(now_ms=now)  # nothing sealed yet: nothing raw may go
    (kept,) = (await s.query("SELECT count(*) FROM readings"))[0]
    sealed_until = T0 + DAY_MS // 2  # the ledger sealed the first half day
    await s.set_meta("ledger_sealed_until_ms", str(sealed_until))
    await s.maintain(now_ms=now)
    (oldest,) = (await s.query("SELECT min(t_ms) FROM readings"))[0]
    await s.close()
    assert kept == 3 * 24 * 60
    assert oldest == sealed_until
