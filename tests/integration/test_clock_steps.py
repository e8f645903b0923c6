"""Wall-clock steps under a real daemon: sampling keeps its pace, steps are logged and counted,
and readings stamped inside an already sealed period are flagged, never committed late.

The daemon runs under libfaketime (Debian `faketime`), whose offset file is re-read at every call,
so the test steps the wall clock of the running process while its steady clock runs on.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from daisee_node.readings import Quality
from tests.conftest import wait_for, write_config


def faketime_env(offset_file: Path) -> dict[str, str]:
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is missing: ./run test installs the Debian package faketime")
    offset_file.write_text("+0\n")
    return {
        "LD_PRELOAD": str(found[0]),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        # Only the wall clock steps, as with NTP or `date -s`.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def query(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def counter(db: Path, name: str) -> int:
    try:
        rows = query(db, "SELECT value FROM counters WHERE name = ?", (name,))
    except sqlite3.OperationalError:
        return 0
    return int(rows[0][0]) if rows else 0


def reading_count(db: Path) -> int:
    try:
        return int(query(db, "SELECT count(*) FROM readings")[0][0])
    except sqlite3.OperationalError:
        return 0


def node_config(tmp_path: Path, chain: bool = False) -> Path:
    sections: dict[str, object] = {
        "node": {"id": "clock-node", "data_dir": str(tmp_path / "data")},
        "sensors": [{"name": "load", "kind": "simulated", "model": "load", "interval_s": 0.1}],
    }
    if chain:
        from daisee_node.ledger.keys import new_keystore

        data = tmp_path / "data"
        data.mkdir(mode=0o700)
        new_keystore(data / "node-key.json", data / "node-key.pass")
        sections["chain"] = {"rpc_url": "embedded", "period_s": 10, "seal_delay_s": 0}
    return write_config(tmp_path / "node.toml", sections)


@pytest.mark.slow
def test_a_backward_wall_clock_step_does_not_stop_sampling(tmp_path: Path, daemon) -> None:
    offset = tmp_path / "faketime"
    d = daemon(node_config(tmp_path), env=faketime_env(offset))
    db = tmp_path / "data" / "node.db"
    wait_for(lambda: reading_count(db) >= 20, timeout=30)

    offset.write_text("-3600\n")  # one hour back
    stepped_at = reading_count(db)
    # At 10 readings a second, 20 more arrive within a few seconds unless sampling stalled.
    wait_for(lambda: reading_count(db) >= stepped_at + 20, timeout=8)
    wait_for(lambda: counter(db, "clock.steps") == 1, timeout=8)
    newest = query(db, "SELECT max(t_ms) FROM readings WHERE t_ms < ?", (time.time() * 1000 - 1e6,))
    assert newest[0][0] is not None, "no reading stamped with the stepped-back wall clock"

    steps = [
        json.loads(line)
        for line in d.output().splitlines()
        if line.startswith("{") and "wall clock stepped" in line
    ]
    assert len(steps) == 1
    assert steps[0]["direction"] == "back" and -3610 < steps[0]["step_s"] < -3590


@pytest.mark.slow
def test_readings_stamped_in_a_sealed_period_are_flagged_late(tmp_path: Path, daemon) -> None:
    offset = tmp_path / "faketime"
    daemon(node_config(tmp_path, chain=True), env=faketime_env(offset))
    db = tmp_path / "data" / "node.db"
    wait_for(lambda: counter(db, "ledger.sealed_seq") >= 2, timeout=60)
    sealed = query(db, "SELECT seq, t0, t1, count FROM commitments ORDER BY seq")
    sealed_until = max(int(str(t1)) for _, _, t1, _ in sealed)

    offset.write_text("-25\n")  # back into the periods just sealed
    wait_for(lambda: counter(db, "readings.late") >= 10, timeout=10)
    late = query(db, "SELECT t_ms FROM readings WHERE quality = ?", (int(Quality.LATE),))
    assert late and all(int(str(t)) < sealed_until for (t,) in late)

    # Sealed periods stay as they were: none reopened, none sealed twice, seqs in order.
    wait_for(lambda: counter(db, "ledger.sealed_seq") >= len(sealed) + 1, timeout=60)
    after = query(db, "SELECT seq, t0, t1, count FROM commitments ORDER BY seq")
    assert after[: len(sealed)] == sealed
    starts = [int(str(t0)) for _, t0, _, _ in after]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert [s for s, *_ in after] == list(range(1, len(after) + 1))
