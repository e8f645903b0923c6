"""An ADS1115 node as a real process: energy counters survive restarts; `calibrate` works."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import db_rows, run_cli, wait_for, write_config


def ads_config(tmp_path: Path, fake: dict) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"id": "ads-node", "data_dir": str(tmp_path / "data")},
            "store": {"flush_interval_s": 0.1},
            "sensors": [
                {
                    "name": "battery",
                    "kind": "ads1115",
                    "bus": "fake",
                    "address": 0x48,
                    "channel": 0,
                    "current_sensor": "acs712-20a",
                    "mode": "dc",
                    "window_s": 0.05,
                    "interval_s": 0.1,
                    "voltage_v": 48.0,
                    "fake": fake,
                }
            ],
        },
    )


def latest(db: Path, channel: str) -> float | None:
    rows = db_rows(
        db,
        "SELECT l.value FROM latest l JOIN channels c ON c.id = l.channel_id WHERE c.name = ?",
        (channel,),
    )
    return rows[0][0] if rows else None


def test_energy_counters_continue_across_a_restart(tmp_path: Path, daemon) -> None:
    path = ads_config(tmp_path, {"dc_a": 10.0, "noise_a": 0.02})  # 480 W charging
    db = tmp_path / "data" / "node.db"
    d = daemon(path)
    wait_for(lambda: (latest(db, "battery.import_wh") or 0) > 0.05, timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    before = latest(db, "battery.import_wh")
    assert latest(db, "battery.current_a") == pytest.approx(10.0, abs=0.05)

    d = daemon(path)
    wait_for(lambda: (latest(db, "battery.import_wh") or 0) > before + 0.05, timeout=30)
    d.signal(signal.SIGTERM)
    assert d.wait()[0] == 0
    values = [
        v
        for (v,) in db_rows(
            db,
            "SELECT r.value FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.name = 'battery.import_wh' ORDER BY r.t_ms",
        )
    ]
    assert values == sorted(values), "the counter must never restart from zero"
    assert values[-1] > before


def test_calibrate_command_stores_the_zero_and_the_node_uses_it(tmp_path: Path, daemon) -> None:
    path = ads_config(tmp_path, {"dc_a": 0.0, "zero_error_v": -0.04})  # reads -0.4 A uncalibrated
    result = run_cli("calibrate", "-c", str(path), "--seconds", "0.3")
    assert result.returncode == 0, result.stderr
    assert "battery: zero 2.46" in result.stdout
    assert (tmp_path / "data" / "calibration.json").exists()

    d = daemon(path)
    db = tmp_path / "data" / "node.db"
    wait_for(lambda: latest(db, "battery.current_a") is not None, timeout=30)
    d.signal(signal.SIGTERM)
    d.wait()
    assert abs(latest(db, "battery.current_a")) < 0.02

    # While the node runs, calibrate refuses to touch the ADC.
    d = daemon(path)
    # the lock is taken before the pid is written; the file still names the last daemon before
    pid_file = tmp_path / "data" / "daisee-node.pid"
    wait_for(lambda: pid_file.read_text().strip() == str(d.proc.pid))
    busy = run_cli("calibrate", "-c", str(path))
    assert busy.returncode == 1 and "stop it first" in busy.stderr
