"""Costs that must stay flat in the size of the database, on a 30-day node database.

    .venv/bin/python bench/status_at_scale.py [--days 30] [--channels 10] [--rate-hz 1]

Builds (once, cached under /tmp) a database of `days` of readings through the store's own schema,
filled with plain sqlite3 bulk inserts: aggregates up to two days before the end (the node was
stopped for two days: the first rollup has that backlog), a rule event every ten minutes. Then,
in the same run, each figure against the shape the store had before (the reference):

- `status`: `read_status` in-process (median of 5) against the old queries (min and max asked
  together, count(*) of the aggregates, a GROUP BY over the events);
- start: `Store.open` against the full-file `PRAGMA quick_check` the old start ran before READY;
  the full `integrity_check`, now run after READY, is timed too;
- first rollup after the stop: the longest time one maintenance turn holds the writer against one
  pass over the whole backlog.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from daisee_node import logs
from daisee_node.status import read_status
from daisee_node.store import DAY_MS, MINUTE_MS, Retention, Store, db_path

T0 = 1_760_000_000_000 // DAY_MS * DAY_MS
STOPPED_DAYS = 2
TARGET_STATUS_S = 0.050
# Keep everything: the bench measures rollup, not retention.
KEEP = Retention(raw_days=3650, aggregate_days=3650, maintenance_interval_s=3600)


def readings(days: int, channels: int, rate_hz: float) -> Iterator[tuple[int, int, float, int]]:
    step = int(1000 / rate_hz)
    for t in range(T0, T0 + days * DAY_MS, step):
        for c in range(1, channels + 1):
            yield (t, c, float((t // step + c) % 5000), 0)


def aggregates(days: int, channels: int) -> Iterator[tuple[int, ...]]:
    for minute in range(T0 // MINUTE_MS, (T0 + days * DAY_MS) // MINUTE_MS):
        for c in range(1, channels + 1):
            yield (minute, c, 0.0, 4999.0, 2500.0, 1.0, 60, 0)


def build(folder: Path, days: int, channels: int, rate_hz: float) -> float:
    """The cached database (schema by `Store`, rows by plain sqlite3); seconds spent building."""
    path = db_path(folder)
    done = folder / "built"
    if done.exists():
        return 0.0
    start = time.perf_counter()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in folder.iterdir():
        p.unlink()

    async def schema() -> None:
        async with Store(path):
            pass

    asyncio.run(schema())
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO channels (id, name, unit) VALUES (?, ?, 'W')",
        [(c, f"ch{c}.power_w") for c in range(1, channels + 1)],
    )
    conn.executemany("INSERT INTO readings VALUES (?,?,?,?)", readings(days, channels, rate_hz))
    conn.executemany(
        "INSERT INTO readings_1m VALUES (?,?,?,?,?,?,?,?)",
        aggregates(days - STOPPED_DAYS, channels),
    )
    end = T0 + days * DAY_MS - int(1000 / rate_hz)
    conn.executemany(
        "INSERT INTO latest VALUES (?,?,?,0)", [(c, end, 1.0) for c in range(1, channels + 1)]
    )
    n = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
    conn.execute("INSERT INTO counters VALUES ('readings_stored', ?, ?)", (n, end))
    conn.executemany(
        "INSERT INTO events (t_ms, kind, name, target, state, reason) VALUES (?,?,?,?,?,?)",
        [
            (t, "rule", "surplus", "relay.heater", "on" if k % 2 else "off", "pv > load")
            for k, t in enumerate(range(T0, T0 + days * DAY_MS, 10 * MINUTE_MS))
        ],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    done.write_text("ok\n")
    return time.perf_counter() - start


def reset_backlog(path: Path, days: int) -> int:
    """Undo the last run's rollup: the node stopped `STOPPED_DAYS` before the newest reading."""
    stop = T0 + (days - STOPPED_DAYS) * DAY_MS
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("DELETE FROM readings_1m WHERE minute >= ?", (stop // MINUTE_MS,))
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('rollup_until_ms', ?)", (str(stop),))
    conn.execute("DELETE FROM meta WHERE key LIKE 'last_event%'")
    conn.execute("DELETE FROM counters WHERE name = 'aggregates_stored'")
    conn.execute("COMMIT")
    conn.close()
    return T0 + days * DAY_MS


def old_status_queries(path: Path) -> None:
    """What `status` asked before: the scanning shapes."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.execute("SELECT min(t_ms), max(t_ms) FROM readings").fetchone()
    conn.execute("SELECT count(*) FROM readings_1m").fetchone()
    conn.execute(
        "SELECT kind, name, target, state, reason, t_ms, max(id) FROM events "
        "GROUP BY kind, name, target"
    ).fetchall()
    conn.execute("SELECT name, value FROM counters").fetchall()
    conn.close()


def warm(path: Path) -> None:
    """Read the file once, so every figure is taken with it in the page cache (as on a live
    node); a cold read of 500 MB from a shared virtual disk swamps what is measured."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def timed(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def store_figures(folder: Path, now_ms: int) -> dict[str, float]:
    path = db_path(folder)
    t = time.perf_counter()
    store = Store(path, retention=KEEP)
    await store.open()
    open_s = time.perf_counter() - t
    turns = []
    while True:
        t = time.perf_counter()
        done = await store.maintain(now_ms=now_ms, budget_s=KEEP.maintenance_budget_s)
        turns.append(time.perf_counter() - t)
        if done:
            break
    t = time.perf_counter()
    ok = await store.check_integrity()
    integrity_s = time.perf_counter() - t
    await store.close()
    if not ok:
        raise SystemExit("the benchmark database failed its integrity check")
    return {
        "open_s": open_s,
        "rollup_first_turn_s": turns[0],
        "rollup_longest_turn_s": max(turns),
        "rollup_turns": len(turns),
        "rollup_total_s": sum(turns),
        "integrity_check_after_ready_s": integrity_s,
    }


async def one_pass_rollup(folder: Path, now_ms: int) -> float:
    """The reference: the whole backlog at once, the writer held until it is done."""
    store = Store(db_path(folder), retention=KEEP)
    await store.open()
    t = time.perf_counter()
    await store.maintain(now_ms=now_ms)
    took = time.perf_counter() - t
    await store.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--rate-hz", type=float, default=1.0)
    parser.add_argument("--cache", type=Path, default=None, help="where the database is kept")
    args = parser.parse_args()
    logs.configure("warning", "json")
    folder = args.cache or Path(
        f"/tmp/daisee-bench-status-{args.days}d-{args.channels}ch-{args.rate_hz:g}hz"
    )
    build_s = build(folder, args.days, args.channels, args.rate_hz)
    path = db_path(folder)

    now_ms = reset_backlog(path, args.days)
    warm(path)
    ours = asyncio.run(store_figures(folder, now_ms))
    status_s = timed(lambda: read_status(folder))
    report = read_status(folder)
    old_status_s = timed(lambda: old_status_queries(path))

    conn = sqlite3.connect(path)
    t = time.perf_counter()
    conn.execute("PRAGMA quick_check").fetchall()
    old_check_s = time.perf_counter() - t
    conn.close()

    now_ms = reset_backlog(path, args.days)
    one_pass_s = asyncio.run(one_pass_rollup(folder, now_ms))

    print(
        json.dumps(
            {
                "bench": "status_at_scale",
                "days": args.days,
                "readings": report["database"]["readings"],
                "db_bytes": report["database"]["bytes"],
                "status_s": round(status_s, 4),
                "status_reference_s": round(old_status_s, 4),
                "status_gain": round(old_status_s / status_s, 1),
                "status_target_s": TARGET_STATUS_S,
                "status_ok": status_s <= TARGET_STATUS_S,
                "open_s": round(ours["open_s"], 4),
                "open_reference_quick_check_s": round(old_check_s, 3),
                "integrity_check_after_ready_s": round(ours["integrity_check_after_ready_s"], 3),
                "rollup_backlog_days": STOPPED_DAYS,
                "rollup_first_turn_s": round(ours["rollup_first_turn_s"], 3),
                "rollup_longest_turn_s": round(ours["rollup_longest_turn_s"], 3),
                "rollup_turns": ours["rollup_turns"],
                "rollup_total_s": round(ours["rollup_total_s"], 2),
                "rollup_reference_one_pass_s": round(one_pass_s, 2),
                "build_s": round(build_s, 1),
                "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
