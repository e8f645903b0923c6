"""Costs that must not grow with the data: the start, `status`, rollup after a long stop, events.

Behaviour, not timing: the full integrity check runs after start (the writer goes on meanwhile),
status queries search an index instead of scanning, a backlog is rolled up in bounded turns, and
events go with retention.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import daisee_node.status as status_module
from daisee_node.readings import Quality, Reading
from daisee_node.status import read_status, render_status
from daisee_node.store import DAY_MS, MINUTE_MS, Retention, Store
from tests.conftest import until
from tests.support.clocks import FixedClock

T0 = 1_781_000_000_000 // MINUTE_MS * MINUTE_MS
#: tables whose size grows with the data: no status query may scan them
GROWING = ("readings", "readings_1m", "events")


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def filled(path: Path, readings: list[Reading], **retention: Any) -> None:
    """A closed node database holding `readings`."""
    s = Store(path, clock=FixedClock(T0), retention=Retention(**retention))
    await s.open()
    s.put_many(readings)
    s.stop()
    await s.run()
    await s.close()


async def with_writer(store: Store, body: Callable[[], Awaitable[None]]) -> None:
    writer = asyncio.create_task(store.run())
    try:
        await body()
    finally:
        store.stop()
        await writer
        await store.close()


# -- the full integrity check runs after start ---------------------------------------------------


async def test_the_full_check_runs_after_open_while_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.db"
    await filled(path, [Reading("a.x_w", T0 + i * 1000, 1.0) for i in range(100)])
    entered, release = threading.Event(), threading.Event()
    real = Store._integrity_findings

    def slow_check(self: Store) -> list[str] | None:
        entered.set()
        release.wait(30)
        return real(self)

    monkeypatch.setattr(Store, "_integrity_findings", slow_check)
    s = Store(
        path,
        clock=FixedClock(T0),
        retention=Retention(flush_interval_s=0.01, integrity_delay_s=0.0),
    )
    await s.open()
    assert not entered.is_set()  # open (what runs before READY) left the full check alone

    async def body() -> None:
        await until(entered.is_set)
        s.put(Reading("a.x_w", T0 + 500_000, 2.0))
        await asyncio.wait_for(s.flush(), 10)  # committed while the check is still running
        assert s.stats.integrity_checks == 0
        release.set()
        await until(lambda: s.stats.integrity_checks == 1)
        assert s.stats.integrity_failures == 0

    try:
        await with_writer(s, body)
    finally:
        release.set()
    assert rows(path, "SELECT count(*) FROM readings") == [(101,)]
    assert rows(path, "SELECT name FROM counters WHERE name = 'store.integrity_ok_ms'")


def damage_oldest_leaf(path: Path) -> None:
    """Overwrite the readings table's first leaf page: far from anything a crash can touch."""
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (page,) = conn.execute(
        "SELECT pageno FROM dbstat WHERE name = 'readings' AND pagetype = 'leaf' "
        "ORDER BY path LIMIT 1"
    ).fetchone()
    conn.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * page_size + 8)
        f.write(bytes((i * 37 + 11) % 256 for i in range(page_size - 8)))


async def test_damage_found_after_start_is_logged_counted_and_moved_aside_at_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    await filled(path, [Reading("a.x_w", T0 + i * 1000, float(i)) for i in range(20_000)])
    damage_oldest_leaf(path)
    s = Store(
        path,
        clock=FixedClock(T0),
        retention=Retention(flush_interval_s=0.01, integrity_delay_s=0.0),
    )
    with capture_logs() as logs:
        await s.open()  # the damage is not where a crash writes: the start does not see it

        async def body() -> None:
            await until(lambda: s.stats.integrity_checks == 1)
            s.put(Reading("a.x_w", T0 + DAY_MS, 1.0))
            await asyncio.wait_for(s.flush(), 10)  # the node goes on until its next start

        await with_writer(s, body)
    assert not list(tmp_path.glob("*corrupt*"))
    assert s.stats.integrity_failures == 1
    errors = [e for e in logs if e["log_level"] == "error" and "integrity" in e["event"]]
    assert errors and errors[0]["found"]
    assert s.integrity_mark.exists()
    assert rows(path, "SELECT value FROM counters WHERE name = 'store.integrity_failures'") == [
        (1,)
    ]

    report = read_status(tmp_path)  # the damaged page is reported, not raised
    assert report["database"]["integrity"]["damaged"] is True
    assert report["database"]["integrity"]["failures"] == 1
    assert "DAMAGED" in render_status(report)

    s2 = Store(path, clock=FixedClock(T0))
    await s2.open()
    await s2.close()
    kept = sorted(p.name for p in tmp_path.glob("node.db.corrupt-*"))
    assert len(kept) == 2 and kept[1].endswith(".integrity-failed"), kept
    assert not s2.integrity_mark.exists()
    assert rows(path, "SELECT count(*) FROM readings") == [(0,)]
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    assert read_status(tmp_path)["database"]["integrity"]["damaged"] is False


# -- events go with retention ---------------------------------------------------------------------


async def test_events_older_than_retention_are_pruned_and_status_keeps_the_last_reason(
    tmp_path: Path,
) -> None:
    s = Store(tmp_path / "node.db", clock=FixedClock(T0), retention=Retention(raw_days=2))
    await s.open()
    s.set_counter("relay.heater.state", 1)
    s.put_event(T0, "relay", "heater", None, "on", "surplus since noon")
    for k in range(1, 5):  # one event a day for a rule
        s.put_event(T0 + k * DAY_MS, "rule", "cheap", "relay.pump", "on", f"day {k}")
    s.stop()
    await s.run()
    await s.maintain(now_ms=T0 + 4 * DAY_MS + 1000)
    left = await s.query("SELECT t_ms FROM events ORDER BY t_ms")
    await s.close()
    assert left == [(T0 + 3 * DAY_MS,), (T0 + 4 * DAY_MS,)]
    report = read_status(tmp_path)
    assert report["relays"]["heater"] == {"state": "on", "reason": "surplus since noon"}
    assert report["rules"]["cheap"]["reason"] == "day 4"

    s = Store(tmp_path / "node.db", retention=Retention(events_days=0.5))
    await s.open()
    await s.maintain(now_ms=T0 + 4 * DAY_MS + 1000)
    assert await s.query("SELECT t_ms FROM events") == [(T0 + 4 * DAY_MS,)]
    await s.close()


# -- rollup of a long backlog ---------------------------------------------------------------------


def backlog(hours: int) -> list[Reading]:
    """Two channels every 10 s, with a gap (the node was off) and a bad reading now and then."""
    out = []
    for k in range(hours * 360):
        t = T0 + k * 10_000
        if 2 * 3_600_000 <= t - T0 < 5 * 3_600_000:
            continue
        out.append(Reading("pv.power_w", t, float(k % 97)))
        q = Quality.SOURCE_ERROR if k % 11 == 0 else Quality.GOOD
        out.append(Reading("load.power_w", t, float(k % 13), q))
    return out


AGGREGATES = (
    "SELECT c.name, a.minute, a.min, a.max, a.mean, a.last, a.count, a.bad FROM readings_1m a "
    "JOIN channels c ON c.id = a.channel_id ORDER BY c.name, a.minute"
)


async def test_a_long_backlog_rolls_up_in_bounded_turns_to_the_same_aggregates(
    tmp_path: Path,
) -> None:
    series = backlog(12)
    now = T0 + 12 * 3_600_000 + 10_000
    one, turns = tmp_path / "one", tmp_path / "turns"
    for folder in (one, turns):
        folder.mkdir()
        await filled(folder / "node.db", series)

    s = Store(one / "node.db", clock=FixedClock(T0))
    await s.open()
    assert await s.maintain(now_ms=now) is True
    expected = await s.query(AGGREGATES)
    await s.close()

    s = Store(turns / "node.db", clock=FixedClock(T0))
    await s.open()
    made = []
    done = False
    while not done:
        before = s.stats.rolled_up_minutes
        done = await s.maintain(now_ms=now, budget_s=0.0)
        made.append(s.stats.rolled_up_minutes - before)
        assert len(made) < 1000
    got = await s.query(AGGREGATES)
    await s.close()

    assert len(made) > 50  # many turns, each a bounded slice: 10 minutes of 2 channels
    assert max(made) <= 10 * 2
    assert got == expected and len(got) == 2 * (12 - 3) * 60
    report = read_status(turns)
    assert report["database"]["minute_aggregates"] == len(got)


async def test_the_writer_commits_between_turns_of_a_long_rollup(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    await filled(path, backlog(24))
    clock = FixedClock(T0)
    s = Store(
        path, clock=clock, retention=Retention(flush_interval_s=0.01, maintenance_budget_s=0.0)
    )
    await s.open()
    end = T0 + 24 * 3_600_000

    async def body() -> None:
        clock.t_ms = end + 10_000  # maintenance is due, with a day of backlog
        await until(lambda: s.stats.rolled_up_minutes > 0)
        s.put(Reading("pv.power_w", end + 6_000, 2.0))
        await asyncio.wait_for(s.flush(), 10)
        (rolled,) = (await s.query("SELECT value FROM meta WHERE key = 'rollup_until_ms'"))[0]
        assert int(rolled) < end - 3_600_000  # committed long before the rollup was through
        await until(lambda: s.stats.rolled_up_minutes == 2 * (24 - 3) * 60)

    await with_writer(s, body)


# -- status does not scan -------------------------------------------------------------------------


def scans(conn: sqlite3.Connection, sql: str) -> list[str]:
    """The plan steps of `sql` that scan a table growing with the data.

    A bare `LIMIT 1` probe (no ordering, no grouping) stops at the first row: not a scan.
    """
    upper = " ".join(sql.upper().split())
    if upper.endswith("LIMIT 1") and " ORDER BY " not in upper and " GROUP BY " not in upper:
        return []
    params = (None,) * sql.count("?")
    plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    return [step for step in plan if step.startswith("SCAN") and step.split()[1] in GROWING]


async def test_status_searches_indexes_instead_of_scanning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.db"
    s = Store(path, clock=FixedClock(T0))
    await s.open()
    s.put_many(backlog(3))
    s.put_event(T0, "relay", "heater", None, "on", "surplus")
    s.stop()
    await s.run()
    await s.maintain(now_ms=T0 + 3 * 3_600_000)
    await s.close()

    conn = sqlite3.connect(path)
    assert scans(conn, "SELECT min(t_ms), max(t_ms) FROM readings")  # the old shape does scan
    for sql in status_module.STATUS_QUERIES:
        assert scans(conn, sql) == [], sql

    # Every statement `status` runs, as traced on its own connection.
    traced: list[str] = []
    real = status_module.connect_readonly

    def tracing(p: Path, timeout: float = 5.0) -> sqlite3.Connection:
        c = real(p, timeout)
        c.set_trace_callback(traced.append)
        return c

    monkeypatch.setattr(status_module, "connect_readonly", tracing)
    report = read_status(tmp_path)
    selects = [q for q in traced if q.lstrip().upper().startswith("SELECT")]
    assert len(selects) >= 5
    for sql in selects:
        assert scans(conn, sql) == [], sql
    assert report["database"]["minute_aggregates"] == 2 * 2 * 60
    assert report["database"]["oldest_ms"] == T0
    assert report["database"]["newest_ms"] == T0 + 2 * 3_600_000 - 10_000
    conn.close()
