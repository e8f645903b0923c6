"""SQLite ingest through the real writer task, against one-commit-per-reading in the same run.

    .venv/bin/python bench/ingest.py [--readings N]

Prints one JSON line. Target: ≥ 200,000 readings/s on this machine (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

from daisee_node import logs
from daisee_node.readings import Reading
from daisee_node.store import Retention, Store

TARGET = 200_000
CHANNELS = [f"ch{i}.power_w" for i in range(8)]


async def through_writer(n: int, directory: Path) -> float:
    """Readings/s from the first put to the last commit, producers yielding as sensors do."""
    store = Store(directory / "node.db", retention=Retention(max_pending=n + 1))
    await store.open()
    writer = asyncio.create_task(store.run())
    t0_ms = 1_781_000_000_000
    chunk = 800  # 8 channels × 100 samples, then yield to the loop
    batches = [
        [Reading(CHANNELS[j % 8], t0_ms + (k + j) // 8, float(j)) for j in range(chunk)]
        for k in range(0, n, chunk)
    ]
    start = time.perf_counter()
    for batch in batches:
        store.put_many(batch)
        await asyncio.sleep(0)
    store.stop()
    await writer
    elapsed = time.perf_counter() - start
    written = store.stats.written
    await store.close()
    if written != len(batches) * chunk:
        raise SystemExit(f"wrote {written} of {len(batches) * chunk} readings")
    return written / elapsed


def one_commit_per_reading(n: int, directory: Path) -> float:
    """What a naive logger does: one INSERT and one durable COMMIT per reading."""
    conn = sqlite3.connect(directory / "naive.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE r (t_ms INTEGER, channel TEXT, value REAL, quality INTEGER)")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO r VALUES (?,?,?,?)", (i, CHANNELS[i % 8], float(i), 0))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--readings", type=int, default=1_000_000)
    p.add_argument("--reference-readings", type=int, default=3_000)
    args = p.parse_args()
    logs.configure("warning")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        ours = asyncio.run(through_writer(args.readings, Path(tmp)))
        naive = one_commit_per_reading(args.reference_readings, Path(tmp))
    print(
        json.dumps(
            {
                "bench": "store_ingest",
                "readings": args.readings,
                "readings_per_s": round(ours),
                "target_per_s": TARGET,
                "meets_target": ours >= TARGET,
                "reference": {
                    "name": "one INSERT + durable COMMIT per reading (naive logger)",
                    "readings": args.reference_readings,
                    "readings_per_s": round(naive),
                },
                "speedup_vs_reference": round(ours / naive, 1),
                "sqlite": sqlite3.sqlite_version,
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
