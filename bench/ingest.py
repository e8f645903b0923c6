"""SQLite ingest through the real writer task, each figure beside plain sqlite3 doing the same work.

    .venv/bin/python bench/ingest.py [--commits N] [--rounds N] [--bulk-rows N] [--paces S,S]
    BENCH_DIR=/dev/shm .venv/bin/python bench/ingest.py   # tmpfs: CPU without the disk's fsync

1. CPU per commit with a waiter on every commit (`small_commits`): 8 readings (8 channels) put
   with `put_many`, the running writer commits them, the next 8 are put once that commit is made
   (waited for with `flush`, not with a sleep); flush interval 2 ms. CPU is the whole process's
   (`time.process_time`: the event loop and the writer's thread), divided by the commits the
   writer counted. Reference: plain sqlite3 making the same commits (same statements, same rows)
   back to back in one thread. Every commit here is handed over twice (to the writer's thread and
   back to the waiting loop), which a node's steady stream does not do.
2. CPU per commit at a node's pace (`paced_commits`, the target): a producer on the event loop
   puts 8 readings every `pace` seconds (a loop timer, as a sampling loop does), the writer
   commits at the same interval, nobody waits on a commit (one `flush` after the turn's last
   put). Reference: the same producer on the same loop, committing the same rows with plain
   sqlite3 inside the timer's callback (on the loop, no hand-over). The pace is the workload, not
   a wait: only CPU time is measured (`time.process_time` over the turn, divided by the commits
   counted), so it does not inflate the figure; between commits the machine goes idle, and
   waking from idle costs both sides alike. Paces: 2 ms (thousands of commits in seconds) and
   0.25 s (a node's real pace, 80 commits a side). Target: ≤ 0.2 ms per commit at 0.25 s.
3. Bulk ingest: 8,000 readings a transaction through `put_many` and the writer, each put to its
   commit, summed (writer and reference alternate who goes first); reference: plain sqlite3, the
   same tables and indexes (the store's own migrations), the same statements,
   `journal_mode=WAL` and `synchronous=FULL`, 8,000 rows a transaction. Target: ≥ 0.9× the
   reference.

Writer and reference take turns (rounds of commits, commit by commit in bulk), so a busy disk or
a noisy neighbour on the machine weighs on both alike. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daisee_node import logs
from daisee_node.readings import Reading
from daisee_node.store import MIGRATIONS, Retention, Store

CPU_TARGET_MS = 0.2
BULK_TARGET_RATIO = 0.9
CHANNELS = [f"ch{i}.power_w" for i in range(8)]
#: readings are stamped from now on, as a node's are (the first rollup, 5 s after open, has little
#: to do; a stamp months back would have it roll up every minute since)
T0_MS = time.time_ns() // 1_000_000
#: one reading per channel every 0.25 s: a node's sampling
SMALL_BATCH = 8
BULK_ROWS = 8_000
#: the integrity check and the retention's turns stay out of what is measured (the one turn the
#: store takes 5 s after opening finds next to nothing to do: the readings are recent)
QUIET: dict[str, Any] = {"maintenance_interval_s": 1e9, "integrity_delay_s": 1e9}
WARM_UP = 50
#: seconds of commits a side at each pace (at most `--commits` commits, at least 20)
PACED_SECONDS = 20.0

Callback = Callable[[Sequence[Reading]], object]

INSERT_READING = (
    "INSERT OR IGNORE INTO readings (t_ms, channel_id, value, quality) VALUES (?,?,?,?)"
)
UPSERT_LATEST = (
    "INSERT INTO latest (channel_id, t_ms, value, quality) VALUES (?,?,?,?) "
    "ON CONFLICT(channel_id) DO UPDATE SET t_ms=excluded.t_ms, value=excluded.value, "
    "quality=excluded.quality WHERE excluded.t_ms >= latest.t_ms"
)
ADD_COUNTER = (
    "INSERT INTO counters (name, value, t_ms) VALUES (?,?,?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value, t_ms = excluded.t_ms"
)


def batches(count: int, size: int) -> list[list[Reading]]:
    """`count` batches of `size` readings, 8 channels, time stamps 250 ms apart per round."""
    out = []
    for b in range(count):
        first = b * size
        out.append(
            [
                Reading(CHANNELS[i % 8], T0_MS + ((first + i) // 8) * 250, float(first + i))
                for i in range(size)
            ]
        )
    return out


# -- the reference: plain sqlite3 ---------------------------------------------------------------


def reference_connection(path: Path) -> tuple[sqlite3.Connection, dict[str, int]]:
    """The store's tables and indexes, WAL and synchronous=FULL, as the store sets them."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA temp_store=MEMORY")
    for sql in MIGRATIONS:
        conn.executescript(sql)
    conn.executemany("INSERT INTO channels (name) VALUES (?)", [(n,) for n in CHANNELS])
    ids = {name: cid for cid, name in conn.execute("SELECT id, name FROM channels")}
    return conn, ids


def reference_commit(
    conn: sqlite3.Connection, ids: dict[str, int], batch: Sequence[Reading], now_ms: int
) -> int:
    """What the writer commits for a batch: readings, newest per channel, the stored counter."""
    rows = [(r.t_ms, ids[r.channel], r.value, r.quality) for r in batch]
    latest = {row[1]: row for row in rows}
    conn.execute("BEGIN IMMEDIATE")
    inserted = conn.executemany(INSERT_READING, rows).rowcount
    conn.executemany(UPSERT_LATEST, [(c, t, v, q) for (t, c, v, q) in latest.values()])
    conn.executemany(ADD_COUNTER, [("readings_stored", inserted, now_ms)])
    conn.execute("COMMIT")
    return inserted


# -- the two measurements, writer and reference taking turns --------------------------------------


async def small_commits(directory: Path, commits: int, rounds: int) -> dict[str, float]:
    """CPU per commit of 8 readings: the running writer, and plain sqlite3, round by round."""
    per_round = max(1, commits // rounds)
    work = batches(WARM_UP + per_round * rounds, SMALL_BATCH)
    conn, ids = reference_connection(directory / "reference-small.db")
    store = Store(directory / "small.db", retention=Retention(flush_interval_s=0.002, **QUIET))
    await store.open()
    writer = asyncio.create_task(store.run(), name="store.writer")
    for batch in work[:WARM_UP]:
        reference_commit(conn, ids, batch, T0_MS)
        store.put_many(batch)
        await store.flush()
    ours = theirs = 0.0
    made = 0
    for r in range(rounds):
        part = work[WARM_UP + r * per_round : WARM_UP + (r + 1) * per_round]
        cpu0 = time.process_time()
        for batch in part:
            reference_commit(conn, ids, batch, T0_MS)
        theirs += time.process_time() - cpu0
        before = store.stats.batches
        cpu0 = time.process_time()
        for batch in part:
            store.put_many(batch)
            await store.flush()
        ours += time.process_time() - cpu0
        made += store.stats.batches - before
    written = store.stats.written
    store.stop()
    await writer
    await store.close()
    conn.close()
    if written != len(work) * SMALL_BATCH:
        raise SystemExit(f"the writer wrote {written} of {len(work) * SMALL_BATCH} readings")
    reference_commits = per_round * rounds
    return {
        "commits": made,
        "cpu_ms": ours * 1000 / made,
        "reference_commits": reference_commits,
        "reference_cpu_ms": theirs * 1000 / reference_commits,
    }


async def at_pace(pace_s: float, work: Sequence[Sequence[Reading]], put: Callback) -> None:
    """Call `put` with each batch in turn, one every `pace_s` seconds, from a loop timer."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    batches_left = iter(work)
    due = loop.time()

    def tick() -> None:
        nonlocal due
        batch = next(batches_left, None)
        if batch is None:
            done.set_result(None)
            return
        put(batch)
        due += pace_s
        loop.call_at(due, tick)

    loop.call_soon(tick)
    await done


async def paced_commits(directory: Path, pace_s: float, commits: int) -> dict[str, float]:
    """CPU per commit at a node's pace: the writer, and plain sqlite3 on the loop, in turns."""
    rounds = 4
    per_round = max(1, commits // rounds)
    work = batches(WARM_UP + 2 * per_round * rounds, SMALL_BATCH)
    tag = f"{pace_s:g}"
    conn, ids = reference_connection(directory / f"reference-paced-{tag}.db")
    store = Store(
        directory / f"paced-{tag}.db", retention=Retention(flush_interval_s=pace_s, **QUIET)
    )
    await store.open()
    writer = asyncio.create_task(store.run(), name="store.writer")
    for batch in work[:WARM_UP]:
        reference_commit(conn, ids, batch, T0_MS)
        store.put_many(batch)
        await store.flush()
    ours = theirs = 0.0
    made = 0
    for r in range(rounds):
        first = WARM_UP + 2 * r * per_round
        cpu0 = time.process_time()
        await at_pace(
            pace_s,
            work[first : first + per_round],
            lambda batch: reference_commit(conn, ids, batch, T0_MS),
        )
        theirs += time.process_time() - cpu0
        before = store.stats.batches
        cpu0 = time.process_time()
        await at_pace(pace_s, work[first + per_round : first + 2 * per_round], store.put_many)
        await store.flush()
        ours += time.process_time() - cpu0
        made += store.stats.batches - before
    written = store.stats.written
    store.stop()
    await writer
    await store.close()
    conn.close()
    expected = (WARM_UP + per_round * rounds) * SMALL_BATCH
    if written != expected:
        raise SystemExit(f"the writer wrote {written} of {expected} readings")
    return {
        "pace_s": pace_s,
        "commits": made,
        "cpu_ms": ours * 1000 / made,
        "reference_commits": per_round * rounds,
        "reference_cpu_ms": theirs * 1000 / (per_round * rounds),
    }


async def bulk(directory: Path, rows: int) -> dict[str, float]:
    """Readings/s at 8,000 readings a transaction: the writer and plain sqlite3, turn by turn."""
    work = batches(max(1, rows // BULK_ROWS), BULK_ROWS)
    # The input (hundreds of thousands of readings) out of the collector's sight: otherwise a
    # full collection walks it, on whichever side happens to allocate at that moment.
    gc.collect()
    gc.freeze()
    conn, ids = reference_connection(directory / "reference-bulk.db")
    store = Store(
        directory / "bulk.db",
        retention=Retention(flush_interval_s=0.0, max_pending=2 * BULK_ROWS, **QUIET),
    )
    await store.open()
    writer = asyncio.create_task(store.run(), name="store.writer")
    ours = theirs = 0.0
    reference_written = 0
    before = store.stats.batches
    for i, batch in enumerate(work):
        # Who goes first alternates: the first of a pair meets the other's checkpoint debris.
        for side in (0, 1) if i % 2 else (1, 0):
            start = time.perf_counter()
            if side:
                reference_written += reference_commit(conn, ids, batch, T0_MS)
                theirs += time.perf_counter() - start
            else:
                store.put_many(batch)
                await store.flush()
                ours += time.perf_counter() - start
    made = store.stats.batches - before
    written = store.stats.written
    store.stop()
    await writer
    await store.close()
    conn.close()
    if written != len(work) * BULK_ROWS or reference_written != written:
        raise SystemExit(
            f"wrote {written} (reference {reference_written}) of {len(work) * BULK_ROWS}"
        )
    return {
        "readings": written,
        "commits": made,
        "per_s": written / ours,
        "reference_commits": len(work),
        "reference_per_s": reference_written / theirs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--commits", type=int, default=2_000, help="small commits measured")
    p.add_argument("--rounds", type=int, default=10, help="turns writer and reference take")
    p.add_argument("--bulk-rows", type=int, default=400_000, help="readings ingested in bulk")
    p.add_argument("--paces", default="0.002,0.25", help="producer paces (s), comma-separated")
    args = p.parse_args()
    paces = [float(x) for x in args.paces.split(",") if x.strip()]
    logs.configure("warning")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        small = asyncio.run(small_commits(Path(tmp), args.commits, args.rounds))
        paced = [
            asyncio.run(
                paced_commits(
                    Path(tmp), pace, min(args.commits, max(20, round(PACED_SECONDS / pace)))
                )
            )
            for pace in paces
        ]
        big = asyncio.run(bulk(Path(tmp), args.bulk_rows))
    cpu = small["cpu_ms"]
    ratio = big["per_s"] / big["reference_per_s"]
    # The target is the node's case: 8 readings every 0.25 s (the slowest pace measured).
    node_cpu = max(paced, key=lambda x: x["pace_s"])["cpu_ms"] if paced else cpu
    print(
        json.dumps(
            {
                "bench": "store_ingest",
                "small_commits": {
                    "readings_per_commit": SMALL_BATCH,
                    "waiter_on_every_commit": True,
                    "commits": small["commits"],
                    "cpu_ms_per_commit": round(cpu, 4),
                    "target_ms": CPU_TARGET_MS,
                    "meets_target": cpu <= CPU_TARGET_MS,
                    "reference": {
                        "name": "plain sqlite3, the same commits back to back in one thread",
                        "commits": small["reference_commits"],
                        "cpu_ms_per_commit": round(small["reference_cpu_ms"], 4),
                    },
                    "writer_overhead_ms_per_commit": round(cpu - small["reference_cpu_ms"], 4),
                },
                "paced_commits": [
                    {
                        "pace_s": x["pace_s"],
                        "readings_per_commit": SMALL_BATCH,
                        "commits": x["commits"],
                        "cpu_ms_per_commit": round(x["cpu_ms"], 4),
                        "target_ms": CPU_TARGET_MS,
                        "meets_target": x["cpu_ms"] <= CPU_TARGET_MS,
                        "reference": {
                            "name": "plain sqlite3 committing in the same loop timer, same pace",
                            "commits": x["reference_commits"],
                            "cpu_ms_per_commit": round(x["reference_cpu_ms"], 4),
                        },
                        "writer_overhead_ms_per_commit": round(
                            x["cpu_ms"] - x["reference_cpu_ms"], 4
                        ),
                    }
                    for x in paced
                ],
                "bulk": {
                    "readings_per_commit": BULK_ROWS,
                    "readings": big["readings"],
                    "commits": big["commits"],
                    "readings_per_s": round(big["per_s"]),
                    "reference": {
                        "name": "plain sqlite3, same tables, WAL, synchronous=FULL, 8,000 a txn",
                        "commits": big["reference_commits"],
                        "readings_per_s": round(big["reference_per_s"]),
                    },
                    "ratio_vs_reference": round(ratio, 3),
                    "target_ratio": BULK_TARGET_RATIO,
                    "meets_target": ratio >= BULK_TARGET_RATIO,
                },
                "meets_targets": node_cpu <= CPU_TARGET_MS and ratio >= BULK_TARGET_RATIO,
                "sqlite": sqlite3.sqlite_version,
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
