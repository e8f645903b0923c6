"""`daisee-node demo` and `daisee-node status`, as a new user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import db_rows, run_cli

cli = run_cli


def test_demo_stores_readings_and_status_shows_them(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    run = cli(
        "demo",
        "--data-dir",
        str(data),
        # 80 simulated minutes in 12 s: the key's unlock and the chain's start take seconds of
        # a loaded machine before the first period can be sealed
        "--duration",
        "12",
        "--speed",
        "400",
        "--start",
        "2026-06-21T10:00:00Z",
    )
    assert run.returncode == 0, run.stderr
    summaries = [ln for ln in run.stdout.splitlines() if " UTC " in ln]
    assert len(summaries) >= 2
    assert "2026-06-21 10:" in summaries[0]
    assert "Traceback" not in run.stderr

    stored = db_rows(data / "node.db", "SELECT count(*) FROM readings")[0][0]
    assert stored > 1000
    channels = {n for (n,) in db_rows(data / "node.db", "SELECT name FROM channels")}
    assert {"pv.power_w", "load.power_w", "battery.soc_pct", "grid.power_w"} <= channels

    # `status` only looks: nothing beside the database is created or changed.
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in data.iterdir()}
    assert not (data / "node.db-wal").exists() and not (data / "node.db-shm").exists()
    status = cli("status", "--data-dir", str(data), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["running"] is False
    assert report["database"]["readings"] == stored
    latest = {r["channel"]: r for r in report["latest"]}
    assert set(latest) == channels
    soc = latest["battery.soc_pct"]["value"]
    assert 0 <= soc <= 100
    # A June morning at 10:00 UTC: the roof produces.
    assert latest["pv.power_w"]["value"] > 100

    # at least two 15-minute periods sealed, signed and committed
    ledger = report["ledger"]
    assert ledger["sealed_seq"] >= 2
    assert ledger["confirmed_seq"] >= 1
    assert ledger["sealed_until_ms"] % 900_000 == 0
    assert "periods sealed" in summaries[-1]

    table = cli("status", "--data-dir", str(data))
    assert table.returncode == 0
    assert "battery.soc_pct" in table.stdout and "not running" in table.stdout
    assert f"period {ledger['sealed_seq']}" in table.stdout
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in data.iterdir()} == before
    assert report["store"] == {
        "healthy": True,
        "write_errors": 0,
        "last_error": None,
        "failing_since_ms": None,
        "held_in_memory": 0,
        "dropped": 0,
        "live": False,
    }
    assert "WRITES FAILING" not in table.stdout


def test_a_second_demo_run_continues_the_first(tmp_path: Path) -> None:
    data = tmp_path / "d"
    assert (
        cli("demo", "--data-dir", str(data), "--duration", "1.5", "--speed", "600").returncode == 0
    )
    first_newest = db_rows(data / "node.db", "SELECT max(t_ms) FROM readings")[0][0]
    assert (
        cli("demo", "--data-dir", str(data), "--duration", "1.5", "--speed", "600").returncode == 0
    )
    oldest_new = db_rows(
        data / "node.db", "SELECT min(t_ms) FROM readings WHERE t_ms > ?", (first_newest,)
    )[0][0]
    assert oldest_new is not None  # new readings were stored, not swallowed as duplicates
    counters = dict(db_rows(data / "node.db", "SELECT name, value FROM counters"))
    assert (
        counters["readings_stored"]
        == db_rows(data / "node.db", "SELECT count(*) FROM readings")[0][0]
    )


def test_status_of_an_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("status", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no node database" in result.stderr
    assert "Traceback" not in result.stderr
